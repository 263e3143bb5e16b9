"""score_model and label_model: a judge model reads a prompt built from templates and answers a score or a label.

What is read from the judge's text, in order:
  - a JSON object with `result` (OpenAI's response format, `{"steps": [...], "result": ...}`), code fences allowed;
  - otherwise the whole text (stripped of quotes, a trailing period) as the answer: a number for score_model, one
    of `labels` for label_model (exactly, or ignoring case when that picks a single label).
Anything else is a `model_grader_parse_error` and scores 0, as OpenAI scores a non-numeric answer 0. A score is
clamped to `range` (OpenAI: "the grader's output will be clipped to the given range"); a label scores 1 when it is
one of `passing_labels`, else 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from unsloth_core.graders.errors import GraderUnavailableError
from unsloth_core.graders.judge import Judge, JudgeRequest
from unsloth_core.graders.result import GradeError, GradeResult
from unsloth_core.graders.schema import LabelModelGrader, ScoreModelGrader
from unsloth_core.graders.template import TemplateFieldError, render

_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)
_STEPS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {"description": {"type": "string"}, "conclusion": {"type": "string"}},
        "required": ["description", "conclusion"],
        "additionalProperties": False,
    },
}


def grade_model(grader: ScoreModelGrader | LabelModelGrader, namespaces: Sequence[dict[str, Any]],
                judge: Judge | None) -> list[GradeResult]:
    """Grade a batch: one judge call for every sample whose prompt could be built."""
    if judge is None:
        raise GraderUnavailableError(
            f"{grader.type} grader {grader.label!r} needs a judge model ({grader.model!r}) and none was given: "
            "pass judge=... (the server's model pool)")
    results = [GradeResult(grader.label, grader.type, 0.0) for _ in namespaces]
    requests: list[JudgeRequest] = []
    asked: list[int] = []
    for i, ns in enumerate(namespaces):
        try:
            messages = tuple(_message(m.role, "\n".join(render(text, ns) for text in m.texts())) for m in grader.input)
        except TemplateFieldError as e:
            results[i].errors.append(GradeError(e.code, str(e)))
            continue
        params = grader.sampling_params.model_dump(exclude_none=True) if grader.sampling_params else {}
        requests.append(JudgeRequest(grader.model, messages, params, _response_format(grader)))
        asked.append(i)
    if not requests:
        return results
    try:
        answers = list(judge(requests))
        if len(answers) != len(requests):
            raise RuntimeError(f"the judge answered {len(answers)} of {len(requests)} requests")
    except Exception as e:
        for i in asked:
            results[i].errors.append(GradeError("model_grader_server_error", f"{type(e).__name__}: {e}"))
        return results
    for i, answer in zip(asked, answers):
        _read(grader, str(answer), results[i])
    return results


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": "system" if role == "developer" else role, "content": content}


def _response_format(grader: ScoreModelGrader | LabelModelGrader) -> dict[str, Any]:
    result = {"type": "number"} if isinstance(grader, ScoreModelGrader) else {"type": "string", "enum": grader.labels}
    schema = {"type": "object", "properties": {"steps": _STEPS, "result": result}, "required": ["steps", "result"],
              "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": grader.type, "strict": True, "schema": schema}}


def _read(grader: ScoreModelGrader | LabelModelGrader, answer: str, result: GradeResult) -> None:
    result.details["judge_output"] = answer
    value = _answer(answer)
    if isinstance(grader, ScoreModelGrader):
        score = _number(value)
        if score is None:
            result.errors.append(GradeError("model_grader_parse_error", f"the judge's answer is not a number: "
                                            f"{answer[:200]!r}"))
            return
        low, high = grader.bounds
        result.score = min(max(score, low), high)
        result.details["judge_score"] = score
        result.passed = None if grader.pass_threshold is None else result.score >= grader.pass_threshold
        return
    label = _label(value, grader.labels)
    if label is None:
        result.errors.append(GradeError("model_grader_parse_error", f"the judge's answer is not one of "
                                        f"{grader.labels}: {answer[:200]!r}"))
        return
    result.details["label"] = label
    result.passed = label in grader.passing_labels
    result.score = 1.0 if result.passed else 0.0


def _answer(text: str) -> Any:
    """The `result` of a JSON answer, else the text itself, stripped."""
    body = text.strip()
    fenced = _FENCE.match(body)
    body = fenced.group(1) if fenced else body
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        parsed = body
    value = parsed.get("result") if isinstance(parsed, dict) else parsed
    return value.strip().strip("\"'").rstrip(".").strip() if isinstance(value, str) else value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _label(value: Any, labels: list[str]) -> str | None:
    if not isinstance(value, str):
        return None
    if value in labels:
        return value
    folded = [label for label in labels if label.casefold() == value.casefold()]
    return folded[0] if len(folded) == 1 else None
