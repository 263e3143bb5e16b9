"""python: the user's `grade(sample, item) -> float`, run in the sandbox (see `sandbox`, `sandbox_child`).

Off unless the caller passes `allow_python=True`: it runs code from whoever can submit a grader. What happens when
the code misbehaves:

| what the code does                                   | result                                                    |
|------------------------------------------------------|-----------------------------------------------------------|
| does not compile, defines no grade(sample, item)     | the grader is invalid: `validate_grader` raises           |
| raises at its top level (a failing import)           | every sample scores 0, python_grader_runtime_error        |
| raises in grade(), returns a non-number, NaN or inf  | that sample scores 0, python_grader_runtime_error         |
| opens a socket, runs a subprocess, forks, uses       | the operation raises PermissionError inside grade(); if   |
| ctypes, writes outside its working dir, reads the    | uncaught, that sample scores 0 with the message (and the  |
| data dir (not there: not in its filesystem)          | network does not exist in its namespace anyway)           |
| reads os.environ                                     | finds only PATH, HOME, TMPDIR, LANG and thread counts     |
| runs past seconds_per_sample, or the CPU limit       | that sample scores 0 ("timed out"); the process is killed |
|                                                      | and the samples after it run in a fresh one               |
| allocates past memory_bytes                          | MemoryError in grade(): that sample scores 0              |
| crashes the interpreter, calls os._exit              | that sample scores 0 with the exit reason and stderr      |
| writes more than output_bytes of results             | that sample scores 0; the rest run in a fresh process     |

Refused for the whole call (GraderUnavailableError, nothing graded): python graders not allowed; no namespaces on
this machine while isolation is "strict".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unsloth_core.graders.errors import GraderUnavailableError
from unsloth_core.graders.result import ErrorCode, GradeError, GradeResult
from unsloth_core.graders.sandbox import SandboxConfig, run_python
from unsloth_core.graders.schema import PythonGrader

PYTHON_DISABLED = (
    "python graders are disabled on this server: they run the submitted code. An operator enables them with the "
    "setting UNSLOTH_ALLOW_PYTHON_GRADERS=true (the engine: grade(..., allow_python=True)); they then run in a "
    "sandbox without network, secrets or the data dir")


def grade_python(grader: PythonGrader, namespaces: Sequence[dict[str, Any]], *, allow_python: bool,
                 sandbox: SandboxConfig | None) -> list[GradeResult]:
    if not allow_python:
        raise GraderUnavailableError(PYTHON_DISABLED)
    inputs = [(ns["sample"], ns.get("item") or {}) for ns in namespaces]
    results = []
    for outcome in run_python(grader.source, inputs, sandbox):
        result = GradeResult(grader.label, grader.type, 0.0)
        if outcome.error is not None:
            code: ErrorCode = "python_grader_server_error" if outcome.server else "python_grader_runtime_error"
            result.errors.append(GradeError(code, outcome.error))
        else:
            result.score = float(outcome.score or 0.0)
        results.append(result)
    return results
