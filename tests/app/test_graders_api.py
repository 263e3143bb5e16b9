"""`/v1/fine_tuning/alpha/graders/{validate,run}` through the openai SDK (`client.fine_tuning.alpha.graders`):
graders echoed or refused with the field named, rewards computed by hand, a sample's problems as error flags (not
400s), python graders off unless the operator allows them, and a served model as a score/label judge."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from app.services import graders
from tests.app.conftest import TINY, Backend

EQ = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
      "operation": "eq"}
FUZZY = {"type": "text_similarity", "name": "close", "input": "{{sample.output_text}}",
         "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}
LENGTH = {"type": "python", "name": "length",
          "source": "def grade(sample, item):\n    return len(sample['output_text']) / 10\n"}


def run(client: openai.OpenAI, grader: dict[str, Any], sample: str, item: dict[str, Any] | None = None) -> Any:
    if item is None:
        return client.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample)  # type: ignore[arg-type]
    return client.fine_tuning.alpha.graders.run(grader=grader, model_sample=sample, item=item)  # type: ignore[arg-type]


def flags(result: Any) -> dict[str, Any]:
    """The error flags that are set (with their details), by OpenAI's names."""
    return {k: v for k, v in result.metadata.errors.model_dump(by_alias=True).items() if v}


def bad_request(call: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value


def test_validate_echoes_the_grader(client: openai.OpenAI) -> None:
    out = client.fine_tuning.alpha.graders.validate(grader=EQ)  # type: ignore[arg-type]
    assert out.grader is not None and out.grader.model_dump(exclude_none=True) == EQ
    multi = {"type": "multi", "name": "m", "graders": {"exact": EQ, "close": FUZZY},
             "calculate_output": "0.5 * exact + 0.5 * close"}
    # The SDK types a validated grader as a union it cannot tell apart: read the JSON itself.
    raw = client.fine_tuning.alpha.graders.with_raw_response.validate(grader=multi)  # type: ignore[arg-type]
    echoed = raw.http_response.json()
    assert echoed["grader"]["graders"]["close"]["evaluation_metric"] == "fuzzy_match"
    assert echoed["grader"]["calculate_output"] == "0.5 * exact + 0.5 * close"


@pytest.mark.parametrize(("grader", "param"), [
    ({**EQ, "operation": "contains"}, "grader.operation"),
    ({"type": "multi", "graders": {"a": {**EQ, "operation": "nope"}}, "calculate_output": "a"},
     "grader.graders.a.operation"),
    ({"type": "multi", "graders": {"a": EQ}, "calculate_output": "a + b"}, "grader.calculate_output"),
    ({"type": "regex"}, "grader.type"),
    ({"type": ["string_check"]}, "grader.type"),
    ({"type": "multi", "graders": {"a": {"type": {"x": 1}}}, "calculate_output": "a"}, "grader.graders.a.type"),
    ({**EQ, "reference": "{{answer.text}}"}, "grader.reference"),
    ({**EQ, "extra": 1}, "grader.extra"),
])
def test_validate_names_the_field(client: openai.OpenAI, grader: dict[str, Any], param: str) -> None:
    for call in (lambda: client.fine_tuning.alpha.graders.validate(grader=grader),  # type: ignore[arg-type]
                 lambda: run(client, grader, "x", {})):
        error = bad_request(call)
        assert error.param == param and error.code == "invalid_value" and param in error.message


def test_run_string_check_and_fuzzy_match(client: openai.OpenAI) -> None:
    passed = run(client, EQ, "Paris", {"answer": "Paris"})
    assert passed.reward == 1.0 and flags(passed) == {} and passed.sub_rewards == {}
    assert passed.metadata.name == "exact" and passed.metadata.type == "string_check"
    assert passed.metadata.execution_time >= 0 and passed.api_model_grader_token_usage_per_model == {}
    assert run(client, EQ, "Lyon", {"answer": "Paris"}).reward == 0.0
    assert run(client, {**EQ, "operation": "ilike"}, "It is PARIS.", {"answer": "paris"}).reward == 1.0
    # fuzzy_match is rapidfuzz's WRatio / 100: "abcd" against "abce" is 1 - 2 edits (Indel) / 8 characters = 0.75
    assert run(client, FUZZY, "abcd", {"answer": "abce"}).reward == pytest.approx(0.75)
    assert run(client, FUZZY, "The Eiffel Tower!", {"answer": "the eiffel tower"}).reward == pytest.approx(1.0)


def test_run_multi_with_calculate_output(client: openai.OpenAI) -> None:
    multi = {"type": "multi", "name": "both", "graders": {"exact": EQ, "close": FUZZY},
             "calculate_output": "0.5 * exact + 0.5 * close"}
    out = run(client, multi, "abcd", {"answer": "abce"})
    assert out.reward == pytest.approx(0.375)  # 0.5 * 0 + 0.5 * 0.75
    assert out.sub_rewards == pytest.approx({"exact": 0.0, "close": 0.75})
    assert out.metadata.scores == pytest.approx({"exact": 0.0, "close": 0.75}) and out.metadata.type == "multi"


def test_a_missing_item_field_is_an_error_flag_not_a_400(client: openai.OpenAI) -> None:
    for item in ({"question": "capital of France"}, None):
        out = run(client, EQ, "Paris", item)
        assert out.reward == 0.0 and set(flags(out)) == {"invalid_variable_error"}
    multi = {"type": "multi", "graders": {"exact": EQ, "close": {**FUZZY, "reference": "Paris"}},
             "calculate_output": "exact + close"}
    out = run(client, multi, "Paris", {})
    assert out.reward == 1.0 and out.sub_rewards == {"exact": 0.0, "close": 1.0}  # the other sub-grader still ran
    assert set(flags(out)) == {"invalid_variable_error"}


def test_bodies_that_are_not_graders(client: openai.OpenAI) -> None:
    error = bad_request(lambda: client.post("/fine_tuning/alpha/graders/run", cast_to=object,
                                            body={"grader": EQ, "model_sample": "x", "item": [1, 2]}))
    assert error.param == "item"
    error = bad_request(lambda: client.post("/fine_tuning/alpha/graders/validate", cast_to=object,
                                            body={"grader": "string_check"}))
    assert error.param == "grader"
    cosine = {**FUZZY, "evaluation_metric": "cosine"}
    error = bad_request(lambda: run(client, cosine, "x", {"answer": "y"}))
    assert error.param == "grader.evaluation_metric" and "embedding model" in error.message


def test_other_keys_cannot_grade(backend: Backend) -> None:
    with pytest.raises(openai.AuthenticationError):
        backend.client("sk-not-a-key").fine_tuning.alpha.graders.validate(grader=EQ)  # type: ignore[arg-type]


def test_python_graders_are_off_by_default(client: openai.OpenAI) -> None:
    error = bad_request(lambda: run(client, LENGTH, "abcde", {}))
    assert error.param == "grader.type" and error.code == "python_graders_disabled"
    assert "UNSLOTH_ALLOW_PYTHON_GRADERS" in error.message
    multi = {"type": "multi", "graders": {"exact": EQ, "length": LENGTH}, "calculate_output": "exact + length"}
    error = bad_request(lambda: client.fine_tuning.alpha.graders.validate(grader=multi))  # type: ignore[arg-type]
    assert error.param == "grader.graders.length.type" and error.code == "python_graders_disabled"


def test_python_graders_run_sandboxed_when_allowed(backend: Backend, client: openai.OpenAI,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend.ctx.settings, "allow_python_graders", True)
    try:
        out = run(client, LENGTH, "abcde", {})
    except openai.InternalServerError as e:
        if e.code == "python_sandbox_unavailable":  # the engine's GraderUnavailableError: no namespaces here
            pytest.skip(f"the python sandbox cannot run on this machine: {e.message}")
        raise
    assert out.reward == 0.5 and flags(out) == {} and out.metadata.type == "python"
    reads = {"type": "python", "source": f"import os\ndef grade(sample, item):\n"
                                         f"    return float(len(os.listdir({str(backend.settings.data_dir)!r})))\n"}
    denied = run(client, reads, "x", {})  # the data dir is not in the sandbox's filesystem
    assert denied.reward == 0.0 and denied.metadata.errors.python_grader_runtime_error
    assert "FileNotFoundError" in (denied.metadata.errors.python_grader_runtime_error_details or "")
    # ... nor would it be where a bind (the interpreter's prefix, /usr) brings it in: it is denied by name.
    config = graders.sandbox_config(backend.settings)
    assert config.deny_paths == (str(backend.settings.data_dir),) and config.isolation == "strict"
    assert config.limits.seconds_per_sample == backend.settings.python_grader_seconds


def test_a_served_model_judges(client: openai.OpenAI) -> None:
    label = {"type": "label_model", "name": "judge", "model": TINY, "labels": ["yes", "no"], "passing_labels": ["yes"],
             "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}],
             "sampling_params": {"temperature": 0, "max_completions_tokens": 64}}
    out = run(client, label, "hello", {})
    usage = out.api_model_grader_token_usage_per_model[TINY]
    # ChatML, one token per byte: <|im_start|> "user\n" "Rate hello" <|im_end|> "\n" <|im_start|> "assistant\n"
    assert usage["prompt_tokens"] == 1 + 5 + 10 + 1 + 1 + 1 + 10
    assert 1 <= usage["completion_tokens"] <= 64
    assert set(flags(out)) <= {"model_grader_parse_error"}  # a random model may not finish its JSON in 64 tokens
    assert out.reward in ((0.0,) if flags(out) else (0.0, 1.0))


def test_a_judge_must_be_served_and_usable(client: openai.OpenAI) -> None:
    score = {"type": "score_model", "name": "judge", "model": "gpt-4o-2024-08-06",
             "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}]}
    error = bad_request(lambda: client.fine_tuning.alpha.graders.validate(grader=score))  # type: ignore[arg-type]
    assert error.param == "grader.model" and error.code == "model_not_found" and "gpt-4o" in error.message
    multi = {"type": "multi", "graders": {"exact": EQ, "judge": {**score, "model": "ft:tiny-chat::ftjob-none"}},
             "calculate_output": "exact + judge"}
    error = bad_request(lambda: run(client, multi, "x", {"answer": "x"}))
    assert error.param == "grader.graders.judge.model" and error.code == "model_not_found"
