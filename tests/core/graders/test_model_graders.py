"""score_model and label_model with a deterministic judge: the prompt built, the answer read, the score derived."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from unsloth_core.graders import GraderUnavailableError, JudgeRequest, grade, grade_batch

SCORE = {
    "type": "score_model", "name": "judge", "model": "ft:smollm2-135m-instruct:judge:abc",
    "input": [{"role": "developer", "content": "Grade the answer against {{item.reference}}."},
              {"role": "user", "content": [{"type": "input_text", "text": "Answer: {{sample.output_text}}"}]}],
    "range": [0, 10], "pass_threshold": 5, "sampling_params": {"temperature": 0, "seed": 7},
}
LABEL = {
    "type": "label_model", "model": "judge", "labels": ["correct", "incorrect"], "passing_labels": ["correct"],
    "input": [{"role": "user", "content": "Is '{{sample.output_text}}' the capital of {{item.country}}?"}],
}


class Judge:
    """Answers from a table keyed on `key(the last message)`; records every batch it is given."""

    def __init__(self, answers: dict[str, str], key: Callable[[str], str] = lambda text: text) -> None:
        self.answers, self.key = answers, key
        self.batches: list[Sequence[JudgeRequest]] = []

    def __call__(self, requests: Sequence[JudgeRequest]) -> list[str]:
        self.batches.append(requests)
        return [self.answers[self.key(request.messages[-1]["content"])] for request in requests]


def test_score_model_builds_the_prompt_and_clamps() -> None:
    judge = Judge({"Answer: good": '{"steps": [{"description": "d", "conclusion": "c"}], "result": 7.5}',
                   "Answer: huge": "12", "Answer: fenced": '```json\n{"result": 3}\n```',
                   "Answer: words": "I would say seven"})
    results = grade_batch(SCORE, ["good", "huge", "fenced", "words"], [{"reference": "R"}] * 4, judge=judge)
    assert [r.score for r in results] == [7.5, 10.0, 3.0, 0.0]  # 12 clamped to the range's top
    assert [r.passed for r in results[:3]] == [True, True, False]
    assert results[3].errors[0].code == "model_grader_parse_error"
    assert len(judge.batches) == 1  # one judge call for the batch
    request = judge.batches[0][0]
    assert request.model == "ft:smollm2-135m-instruct:judge:abc"
    assert request.messages == ({"role": "system", "content": "Grade the answer against R."},
                                {"role": "user", "content": "Answer: good"})
    assert request.sampling_params == {"temperature": 0.0, "seed": 7}
    schema = request.response_format["json_schema"]["schema"]
    assert schema["properties"]["result"] == {"type": "number"} and schema["required"] == ["steps", "result"]


def test_label_model() -> None:
    judge = Judge({"Paris": "correct", "Lyon": '{"steps": [], "result": "incorrect"}', "Nice": '"Correct."',
                   "Rome": "maybe"}, key=lambda text: text.split("'")[1])
    results = grade_batch(LABEL, ["Paris", "Lyon", "Nice", "Rome"], [{"country": "France"}] * 4, judge=judge)
    assert [(r.score, r.passed) for r in results[:3]] == [(1.0, True), (0.0, False), (1.0, True)]
    assert results[3].score == 0.0 and results[3].errors[0].code == "model_grader_parse_error"
    assert judge.batches[0][0].response_format["json_schema"]["schema"]["properties"]["result"]["enum"] == \
        ["correct", "incorrect"]


def test_judge_failures_and_missing_fields() -> None:
    def broken(_requests: Sequence[JudgeRequest]) -> list[str]:
        raise ConnectionError("model not loaded")

    result = grade(SCORE, "x", {"reference": "R"}, judge=broken)
    assert result.score == 0.0 and result.error_flags()["model_grader_server_error"] is True
    assert result.error_flags()["model_grader_server_error_details"] == "ConnectionError: model not loaded"
    judge = Judge({})
    result = grade(SCORE, "x", {"ref": "R"}, judge=judge)
    assert result.errors[0].code == "invalid_variable_error" and "item.reference" in result.errors[0].message
    assert judge.batches == []  # nothing to ask
    with pytest.raises(GraderUnavailableError, match="needs a judge model"):
        grade(SCORE, "x", {"reference": "R"})
