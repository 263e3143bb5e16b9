"""Runs a python grader's `grade(sample, item)` over a batch in one locked-down child process.

How the child is locked in is `sandbox_child`'s docstring: its own network, mount, IPC and UTS namespaces, a new
root holding only read-only Python and system libraries, nobody's uid (or a user namespace), an empty environment,
rlimits and an audit hook. This side starts it, feeds it the batch, reads one result line per sample and enforces
the clocks:

  - the first sample may take `startup_seconds + seconds_per_sample` (the interpreter and the source's imports),
    each later one `seconds_per_sample` of wall-clock time; RLIMIT_CPU backs this up from inside the child;
  - a sample that overruns, or whose grading kills the process (a crash, `os._exit`, the address-space limit
    reached outside Python, more than `output_bytes` written), gets that error and the child is killed; the samples
    after it are graded by a fresh child, until `batch_seconds` runs out (the rest are then reported as not graded).

Nothing here raises for a sample: every input gets an `Outcome`. Raised, for the whole batch: GraderUnavailableError
when `isolation` is "strict" (the default) and the namespaces cannot be made on this machine (a container whose
seccomp profile refuses `unshare`, for instance); "best_effort" then runs the weak mode instead (see
`sandbox_child`), which an operator should choose knowing it blocks the network only at the audit-hook level.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from unsloth_core.graders.errors import GraderUnavailableError

DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
SYSTEM_BINDS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache", *DEVICES)
CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/grader",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
    # One thread for the numeric libraries: the child may not start threads (RLIMIT_NPROC 0, the audit hook).
    **dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"), "1"),
}


@dataclass(frozen=True)
class SandboxLimits:
    seconds_per_sample: float = 10.0
    startup_seconds: float = 30.0
    batch_seconds: float = 600.0
    memory_bytes: int = 2 * 1024**3  # address space, as OpenAI's 2 GB
    disk_bytes: int = 256 * 1024**2  # the tmpfs holding the working directory and /tmp; also the largest file
    output_bytes: int = 1024**2  # result lines read from the child
    stderr_bytes: int = 8192  # the tail of the child's stderr kept for a crash report


@dataclass(frozen=True)
class SandboxConfig:
    """How python graders run.

    Args:
        isolation: "strict" needs the namespaces (else nothing runs), "best_effort" falls back to the weak mode
            without them, "weak" never tries them (see `sandbox_child`).
        deny_paths: directories never to show (the data dir): covered by an empty mount if a bind brings them in.
        extra_read_paths: more read-only binds (an nltk_data directory).
    """

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    isolation: Literal["strict", "best_effort", "weak"] = "strict"
    deny_paths: tuple[str, ...] = ()
    extra_read_paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Outcome:
    """One input's result: a score, or an error (`server` when the sandbox failed rather than the user's code)."""

    score: float | None = None
    error: str | None = None
    server: bool = False


@lru_cache(maxsize=1)
def child_code() -> str:
    return Path(__file__).with_name("sandbox_child.py").read_text()


@lru_cache(maxsize=1)
def default_binds() -> tuple[str, ...]:
    """Read-only paths the child sees: the interpreter's prefixes and site-packages, system libraries, devices."""
    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable),
              *site.getsitepackages()}
    python |= {os.path.realpath(path) for path in python} | {os.path.dirname(os.path.realpath(sys.executable))}
    return _outermost({*python, *SYSTEM_BINDS})


def _outermost(paths: set[str]) -> tuple[str, ...]:
    kept: list[str] = []
    for path in sorted(p for p in paths if p and os.path.isabs(p) and p != "/" and os.path.lexists(p)):
        if not any(path.startswith(parent.rstrip("/") + "/") for parent in kept):
            kept.append(path)
    return tuple(kept)


def run_python(source: str, inputs: Sequence[tuple[Any, Any]], config: SandboxConfig | None = None) -> list[Outcome]:
    """Grade every (sample, item) with `source`'s grade(); one Outcome per input, in order."""
    config = config or SandboxConfig()
    limits = config.limits
    outcomes: list[Outcome | None] = [None] * len(inputs)
    base = Path(tempfile.mkdtemp(prefix="unsloth-grader-"))
    try:
        (base / "root").mkdir()
        (base / "work").mkdir(mode=0o700)
        pending = list(range(len(inputs)))
        batch_deadline = time.monotonic() + limits.batch_seconds
        while pending:
            if time.monotonic() >= batch_deadline:
                for i in pending:
                    outcomes[i] = Outcome(error=f"not graded: the batch's {limits.batch_seconds:g} s ran out")
                break
            run = _Run(base, source, [inputs[i] for i in pending], config, batch_deadline)
            results, stop = run.wait()
            for local, outcome in results.items():
                outcomes[pending[local]] = outcome
            if stop is None:
                break
            if stop.server and run.fatal == "isolation":
                raise GraderUnavailableError(
                    f"{stop.error}. python graders need Linux namespaces (unshare: as root, or with unprivileged "
                    "user namespaces allowed); a container needs a seccomp profile that allows unshare. An "
                    "operator may accept weaker isolation instead (SandboxConfig(isolation='best_effort')).")
            done = len(results)
            if run.fatal == "source":  # the source's top level failed: it fails every sample alike
                for i in pending[done:]:
                    outcomes[i] = stop
                break
            outcomes[pending[done]] = stop  # the sample being graded when the child stopped
            pending = pending[done + 1 :]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return [outcome or Outcome(error="not graded", server=True) for outcome in outcomes]


class _Run:
    """One child process over `inputs`: start it, read its result lines, stop it."""

    def __init__(self, base: Path, source: str, inputs: list[tuple[Any, Any]], config: SandboxConfig,
                 batch_deadline: float) -> None:
        limits = config.limits
        self.limits, self.n, self.batch_deadline = limits, len(inputs), batch_deadline
        self.fatal: str | None = None
        job = {
            "source": source,
            "inputs": inputs,
            "isolation": config.isolation,
            "python": sys.executable,
            "child_code": child_code(),
            "root": str(base / "root"),
            "weak_workdir": str(base / "work"),
            "binds": list(_outermost({*default_binds(), *config.extra_read_paths})),
            "deny": [os.path.realpath(path) for path in config.deny_paths],
            "env": CHILD_ENV,
            "parent_pid": os.getpid(),
            "memory_bytes": limits.memory_bytes,
            "disk_bytes": limits.disk_bytes,
            "cpu_seconds": math.ceil(min(limits.startup_seconds + limits.seconds_per_sample * len(inputs),
                                         limits.batch_seconds)),
        }
        job_path = base / "job.json"
        job_path.write_text(json.dumps(job))
        os.chmod(job_path, 0o600)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", child_code(), "stage1", str(job_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd=base,
            start_new_session=True, close_fds=True)

    def wait(self) -> tuple[dict[int, Outcome], Outcome | None]:
        """The results read, by position in this run's inputs, and why the run stopped early (None: it did not)."""
        results: dict[int, Outcome] = {}
        out, err, received = bytearray(), bytearray(), 0
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = {self.proc.stdout.fileno(): out, self.proc.stderr.fileno(): err}
        with selectors.DefaultSelector() as selector:
            for fd in streams:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            last = self.started + self.limits.startup_seconds
            while selector.get_map():
                deadline = min(last + self.limits.seconds_per_sample, self.batch_deadline)
                now = time.monotonic()
                if now >= deadline:
                    return results, self._stop(f"timed out: grade() ran past {self.limits.seconds_per_sample:g} s"
                                               if deadline < self.batch_deadline else
                                               f"timed out: the batch's {self.limits.batch_seconds:g} s ran out")
                for key, _ in selector.select(deadline - now):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                        continue
                    buffer = streams[key.fd]
                    buffer += chunk
                    if buffer is err:
                        del err[: max(0, len(err) - self.limits.stderr_bytes)]
                        continue
                    received += len(chunk)
                    if received > self.limits.output_bytes:
                        return results, self._stop(f"the grader wrote more than {self.limits.output_bytes} bytes "
                                                   "of results")
                    while b"\n" in out:
                        line, _, rest = bytes(out).partition(b"\n")
                        out[:] = rest
                        record = json.loads(line)
                        if "fatal" in record:
                            self.fatal = record["fatal"]
                            self._stop("")
                            return results, Outcome(error=record["error"], server=record["fatal"] == "isolation")
                        results[record["i"]] = Outcome(score=record.get("score"), error=record.get("error"))
                        last = time.monotonic()
        code = self.proc.wait()
        if len(results) == self.n:
            return results, None
        return results, Outcome(error=f"{_exit_reason(code)}; stderr: {err.decode(errors='replace')[-2000:]}")

    def _stop(self, reason: str) -> Outcome:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        return Outcome(error=reason)


def _exit_reason(code: int) -> str:
    if code >= 0:
        return f"the grader process exited (code {code}) before returning this sample's score"
    reasons = {signal.SIGXCPU: "the CPU time limit was reached", signal.SIGXFSZ: "the file size limit was reached",
               signal.SIGKILL: "the grader process was killed (out of memory?)",
               signal.SIGSEGV: "the grader process crashed (segmentation fault)"}
    try:
        name = signal.Signals(-code)
    except ValueError:
        return f"the grader process died of signal {-code}"
    return reasons.get(name, f"the grader process died of signal {name.name}")
