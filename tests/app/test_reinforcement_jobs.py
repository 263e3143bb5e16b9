"""Reinforcement jobs through the openai SDK: OpenAI's `method.reinforcement` with a grader, its hyperparameters and
ours resolved and echoed, RFT data checked against the grader line by line, and the refusals that name the field."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.app.conftest import TINY, Backend, chat_rows, jsonl, upload

TRAIN = "worker.tasks.train"
GRADER = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
          "reference": "{{item.answer}}", "operation": "eq"}


def rft_rows(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "developer", "content": "Answer with a number."},
                          {"role": "user", "content": f"{i} + {i} ="}], "answer": str(2 * i)} for i in range(n)]


def rft_file(client: openai.OpenAI, rows: list[dict[str, Any]] | None = None) -> str:
    return str(upload(client, jsonl(rows if rows is not None else rft_rows(8)), "rft.jsonl").id)


def method(grader: dict[str, Any] | None = None, **hyperparameters: Any) -> Any:
    return {"type": "reinforcement", "reinforcement": {"grader": grader or GRADER,
                                                       "hyperparameters": hyperparameters}}


def test_create_resolves_openais_and_grpos_hyperparameters(backend: Backend) -> None:
    client = backend.client()
    backend.queued_messages()
    training = rft_file(client)
    uploaded = client.files.retrieve(training)
    assert uploaded.status == "processed"  # RFT rows (no assistant turn) are valid fine-tune data
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training, validation_file=rft_file(client),
                                         method=method(compute_multiplier=0.5, reasoning_effort="high", beta=0.04,
                                                       eval_samples=4))
    assert job.method.type == "reinforcement" and job.status == "queued"
    body = job.method.reinforcement.model_dump()  # type: ignore[union-attr]
    assert body["grader"]["reference"] == "{{item.answer}}" and body["grader"]["operation"] == "eq"
    hp = body["hyperparameters"]
    assert "auto" not in json.dumps(hp)
    # compute_multiplier scales the group; reasoning_effort sets the completion's room (the module's table)
    assert (hp["compute_multiplier"], hp["num_generations"]) == (0.5, 4)
    # (the tiny model's context leaves a completion three quarters of it)
    assert (hp["reasoning_effort"], hp["max_completion_length"]) == ("high", min(1024, hp["max_seq_length"] * 3 // 4))
    assert hp["beta"] == 0.04 and hp["loss_type"] == "dapo" and hp["eval_samples"] == 4
    assert hp["temperature"] == 1.0 and hp["top_p"] == 1.0 and hp["eval_interval"] >= 1
    assert hp["learning_rate"] == pytest.approx(1e-5) and hp["lora_r"] == 16 and "packing" not in hp
    assert backend.queued_messages() == [(TRAIN, [job.id, 0])]


def test_defaults_and_the_dry_run(backend: Backend) -> None:
    client = backend.client()
    body = {"model": TINY, "training_file": rft_file(client), "method": method()}
    report = client.post("/fine_tuning/jobs/validate", body=body, cast_to=httpx.Response).json()
    assert report["valid"], report["errors"]
    hp = report["method"]["reinforcement"]["hyperparameters"]
    assert (hp["num_generations"], hp["reasoning_effort"]) == (8, "default")
    assert hp["max_completion_length"] == min(512, hp["max_seq_length"] * 3 // 4)
    assert report["training_file"]["format"] == "rl_messages" and report["n_tokens"] > 0
    assert report["estimated_steps"] == 8 * hp["n_epochs"]  # batch_size 1 prompt per step for 8 rows


def test_every_line_must_hold_the_fields_the_grader_reads(backend: Backend) -> None:
    client = backend.client()
    rows = rft_rows(6)
    del rows[1]["answer"], rows[4]["answer"]
    training = rft_file(client, rows)
    body = {"model": TINY, "training_file": training, "method": method()}
    report = client.post("/fine_tuning/jobs/validate", body=body, cast_to=httpx.Response).json()
    assert [(e["param"], e["code"], e["line"]) for e in report["errors"]] == [
        ("training_file", "missing_grader_field", 2), ("training_file", "missing_grader_field", 5)]
    assert "item.answer" in report["errors"][0]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(**body)
    assert (e.value.param, e.value.code) == ("training_file", "missing_grader_field")
    assert "Line 2" in str(e.value.message)


@pytest.mark.parametrize(("grader", "param", "code"), [
    ({**GRADER, "operation": "contains"}, "method.reinforcement.grader.operation", "invalid_grader"),
    ({"type": "multi", "graders": {"a": {**GRADER, "operation": "x"}}, "calculate_output": "a"},
     "method.reinforcement.grader.graders.a.operation", "invalid_grader"),
    ({"type": "multi", "graders": {"a": GRADER}, "calculate_output": "a + b"},
     "method.reinforcement.grader.calculate_output", "invalid_grader"),
    ({"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"},
     "method.reinforcement.grader", "python_graders_disabled"),
    ({"type": "score_model", "name": "judge", "model": "no-such-judge", "range": [0, 1],
      "input": [{"role": "user", "content": "Score {{sample.output_text}}"}]},
     "method.reinforcement.grader", "model_not_found"),
])
def test_graders_that_cannot_run_are_refused_by_path(backend: Backend, grader: dict[str, Any], param: str,
                                                     code: str) -> None:
    client = backend.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=TINY, training_file=rft_file(client), method=method(grader))
    assert (e.value.param, e.value.code) == (param, code)


def test_the_data_must_fit_the_method(backend: Backend) -> None:
    client = backend.client()
    sft = str(upload(client, jsonl(chat_rows(4))).id)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=TINY, training_file=sft, method=method())
    assert (e.value.param, e.value.code) == ("training_file", "wrong_purpose")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model=TINY, training_file=rft_file(client))
    assert (e.value.param, e.value.code) == ("training_file", "wrong_purpose")
    with pytest.raises(openai.BadRequestError) as e:  # OpenAI's shape: the grader is required
        client.fine_tuning.jobs.create(model=TINY, training_file=rft_file(client),
                                       method={"type": "reinforcement", "reinforcement": {}})  # type: ignore[typeddict-item]
    assert e.value.status_code == 400 and "grader" in str(e.value.param)
