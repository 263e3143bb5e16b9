"""Schemathesis against our own `/openapi.json` on a live server (reliability.md A1): every check, the
authentication check (`ignored_auth`) included, every phase (examples, coverage, fuzzing, stateful), with a valid
key. Zero failures, zero errors.

The generator is pointed at real objects part of the time (a processed file, a queued and a finished job, the base
model, a fine-tune and its checkpoint), so the operations reach their logic instead of only their 404s.

What is configured rather than derived from the schema, and why it is our contract and not a gap in the document:
- `positive_data_acceptance` also accepts 400 where a schema-valid request is refused by the state of what it
  names, as OpenAI's API does (no schema can say which models exist, how long a prompt is in tokens or what state a
  job is in):
  - job create: an unknown `model` or `training_file` (OpenAI: 400 `invalid_request_error`); and 422 for an
    Idempotency-Key sent again with another body (the IETF idempotency-key draft; the stateful phase reuses header
    values across bodies);
  - completions: a prompt plus `max_tokens` beyond the model's context (OpenAI: 400 `context_length_exceeded`), `n`
    above the server's cap;
  - cancel / pause / resume of a job whose state does not allow it, e.g. cancelling a succeeded job (OpenAI: 400
    `invalid_request_error`; service_api.md: bad state is 400, not 409, which the SDK would retry);
  - deleting a file a queued or running job still needs (400 `file_in_use`, the same rule);
  - exports: a peft export of a base model (400 `model_has_no_adapter`), a quantization the format does not take
    (`merged` with `q4_0`), an Ollama Modelfile for another format or a template Ollama cannot take (the schema
    lists each field's values, not which pairs go together), a reused Idempotency-Key (422); cancelling a finished
    export, deleting a queued or running one (400, as for jobs);
  - a file's content with a `Range` beyond its size (416 `range_not_satisfiable`: no schema knows the size);
  - evals: a testing criterion that is no runnable grader (as graders/validate); a run whose model, file or items
    are not there or do not fit the eval; canceling a finished run, deleting an active run or an eval with one.
  - a tool-call check whose conversations hold no tool-calling turn, or whose model cannot be given tools (400);
  - API keys (`/v1/organization/admin_api_keys`): the run's key is a user key, and only an admin key may manage
    keys (OpenAI: 403 `insufficient_permissions`), so each of these operations is a 403 here.
- Completions may take 120 s instead of the response-time check's 10 s: without `max_tokens` one runs to the end of
  the context, as OpenAI's does, and that is seconds on a CPU.
- A live event stream (`?stream=true`) stays open while its job runs: at most 4 events are read, and 2 s is enough.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.conftest import Live

MAX_EXAMPLES = int(os.environ.get("UNSLOTH_FUZZ_EXAMPLES", "10"))  # per operation and phase: ~1 min on 2 cores
SEED = int(os.environ.get("UNSLOTH_FUZZ_SEED", "20261128"))
ST = Path(sys.executable).with_name("st")

# Operations where a schema-valid request can be refused by the state of what it names (see above).
REFUSED_BY_STATE = {
    "POST /v1/fine_tuning/jobs": [400, 422],
    "POST /v1/completions": [400],
    "POST /v1/chat/completions": [400],
    "POST /v1/fine_tuning/jobs/{job_id}/cancel": [400],
    "POST /v1/fine_tuning/jobs/{job_id}/pause": [400],
    "POST /v1/fine_tuning/jobs/{job_id}/resume": [400],
    "DELETE /v1/files/{file_id}": [400],
    "DELETE /v1/models/{model_id}": [403],  # a base model is managed on disk, not deleted over the API
    "POST /v1/exports": [400, 422],
    "POST /v1/exports/{export_id}/cancel": [400],
    "DELETE /v1/exports/{export_id}": [400],
    "GET /v1/files/{file_id}/content": [416],
    # A schema-valid object is not always a grader (a `type` that names none, a template that names no namespace)
    "POST /v1/fine_tuning/alpha/graders/validate": [400],
    "POST /v1/fine_tuning/alpha/graders/run": [400],
    # Evals: the same for their testing criteria; a run's model, file or items that are not there; a run canceled
    # or deleted in a state that does not allow it, an eval deleted while a run of it is active
    "POST /v1/evals": [400],
    "POST /v1/evals/{eval_id}/runs": [400],
    "POST /v1/evals/{eval_id}/runs/{run_id}": [400],
    "POST /v1/evals/{eval_id}/runs/{run_id}/cancel": [400],
    "DELETE /v1/evals/{eval_id}": [400],
    "DELETE /v1/evals/{eval_id}/runs/{run_id}": [400],
    # A tool-call check: conversations with no tool-calling turn, a file that is not there, a model whose chat
    # template follows no tool-call convention, a turn beyond the model's context
    "POST /v1/tool_call_checks": [400],
    # API keys: admin keys only, and the run's key is a user key
    "GET /v1/organization/admin_api_keys": [403],
    "POST /v1/organization/admin_api_keys": [403],
    "GET /v1/organization/admin_api_keys/{key_id}": [403],
    "DELETE /v1/organization/admin_api_keys/{key_id}": [403],
}
# Every request carries a valid key: 401 or 403 is never a valid answer to schema-valid data (issue 15), except
# where an operation above says why.
ACCEPTED = ["2XX", "404", "409", "413", "429"]


def config(live: Live, report_dir: Path) -> str:
    objects = live.objects
    dictionaries = {
        "file_ids": objects["file"], "job_ids": objects["job"], "model_ids": objects["model"],
        "base_models": objects["model"][:1], "export_ids": objects["export"],
    }
    lines = [
        "workers = 1",
        "request-timeout = 30",
        f"seed = {SEED}",
        "max-stream-events = 4",  # a queued job's event stream stays open: read a few events, then hang up
        "continue-on-failure = true",
        "[generation]",
        f"max-examples = {MAX_EXAMPLES}",
        "[checks]",
        "enabled = true",
        "[checks.positive_data_acceptance]",
        f"expected-statuses = {json.dumps(ACCEPTED)}",
        "[cache]",
        "enabled = false",  # nothing written outside tmp_path
        "[reports.ndjson]",
        f'path = "{report_dir / "run.ndjson"}"',
        "[parameters]",
        '"path.file_id" = { dictionary = "file_ids", probability = 0.5 }',
        '"path.job_id" = { dictionary = "job_ids", probability = 0.5 }',
        '"path.model_id" = { dictionary = "model_ids", probability = 0.5 }',
        '"path.export_id" = { dictionary = "export_ids", probability = 0.5 }',
        '"body.training_file" = { dictionary = "file_ids", probability = 0.7 }',
        '"body.validation_file" = { dictionary = "file_ids", probability = 0.3 }',
        '"body.model" = { dictionary = "base_models", probability = 0.7 }',
    ]
    for name, values in dictionaries.items():
        lines += [f"[dictionaries.{name}]", f"values = {json.dumps(values)}"]
    # A live event stream stays open while its job runs (keep-alives every 15 s): read what is there, then hang up.
    lines += ["[[operations]]", 'include-path = "/v1/fine_tuning/jobs/{job_id}/events"', "request-timeout = 2"]
    for operation, statuses in REFUSED_BY_STATE.items():  # one block per operation: the first that matches applies
        path = operation.split(" ")[1]
        expected = sorted({*ACCEPTED, *map(str, statuses)})
        lines += ["[[operations]]", f'include-name = "{operation}"']  # method and path together
        if path.endswith(("completions", "tool_call_checks")):
            # Without max_tokens a completion runs to the end of the context, as OpenAI's does: on the test box's
            # CPU that is seconds past the check's default 10 s. Generation length is the client's choice.
            lines += ["request-timeout = 120", "[operations.checks]", "max_response_time = 120"]
        lines += ["[operations.checks.positive_data_acceptance]", f"expected-statuses = {json.dumps(expected)}"]
    return "\n".join(lines) + "\n"


# PostgreSQL only in CI: it refuses more than SQLite does (NUL in text and jsonb), and the app code is the same.
# UNSLOTH_FUZZ_SQLITE=1 runs the embedded backend too.
BACKENDS = ["postgresql", "sqlite"] if os.environ.get("UNSLOTH_FUZZ_SQLITE") == "1" else ["postgresql"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("live", BACKENDS, indirect=True)
def test_openapi_contract(live: Live, tmp_path: Path) -> None:
    config_file = tmp_path / "schemathesis.toml"
    config_file.write_text(config(live, tmp_path))
    command = [str(ST), "--no-color", "--config-file", str(config_file), "run", f"{live.base_url}/openapi.json",
               "--checks", "all", "-H", f"Authorization: Bearer {live.key}", "--mode", "all",
               "--warnings", "off"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=580, cwd=tmp_path)
    output = done.stdout + done.stderr
    (tmp_path / "output.txt").write_text(output)
    assert done.returncode == 0, f"schemathesis found failures on {live.name}:\n{output[-20000:]}"
    assert " passed" in output, output[-5000:]
