"""An eval's testing criteria: OpenAI's graders, checked as the graders API checks them, each given the id its
results are reported under, and the rule that says whether a graded answer passes.

A criterion is the engine's grader JSON plus what OpenAI's evals add to it: an `id` (`<name>-<uuid>`, assigned here,
the name of its results and of its line in `per_testing_criteria_results`) and `pass_threshold` on python (and multi)
graders, which the engine's own schema does not know and is taken off before it parses them. text_similarity must
say its `pass_threshold`, as OpenAI's evals require.

Whether an answer passes a criterion:
  - a grade that raised an error (a missing item field, a judge's unreadable answer) fails;
  - a grader with its own bar decides (string_check's 1, label_model's passing_labels, a pass_threshold);
  - otherwise (score_model, python or multi without a pass_threshold) the score must reach the middle of its range:
    0.5 for the usual [0, 1].
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import bad_request
from app.db.models import ApiKey
from app.services import graders
from unsloth_core.graders import Grader, GradeResult, ScoreModelGrader, TextSimilarityGrader, validate_grader

EVAL_THRESHOLD_TYPES = ("python", "multi")  # graders whose pass_threshold only OpenAI's evals define
PARAM = "testing_criteria"


@dataclass(frozen=True)
class Criterion:
    """A stored criterion, parsed: its id, the engine's grader, and its pass threshold when the grader lacks one."""

    id: str
    grader: Grader
    pass_threshold: float | None = None

    def passed(self, result: GradeResult) -> bool:
        if result.errors:
            return False
        if result.passed is not None:
            return result.passed
        if self.pass_threshold is not None:
            return result.score >= self.pass_threshold
        low, high = self.grader.bounds if isinstance(self.grader, ScoreModelGrader) else (0.0, 1.0)
        return result.score >= (low + high) / 2


def _split(obj: Mapping[str, Any], param: str) -> tuple[dict[str, Any], float | None]:
    """The engine's grader JSON (no `id`, no evals-only `pass_threshold`) and that threshold. Raises a 400."""
    grader = {k: v for k, v in obj.items() if k != "id"}
    if grader.get("type") not in EVAL_THRESHOLD_TYPES or "pass_threshold" not in grader:
        return grader, None
    threshold = grader.pop("pass_threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
        raise bad_request(f"Invalid grader: {param}.pass_threshold must be a number.", param=f"{param}.pass_threshold")
    return grader, float(threshold)


def check(*, session: Session, settings: Settings, key: ApiKey, criteria: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The criteria as stored: each parsed and runnable here for `key` (python graders allowed, judges served),
    else a 400 naming its field (`testing_criteria[1].model`); each with a new id."""
    stored = []
    for i, obj in enumerate(criteria):
        param = f"{PARAM}[{i}]"
        if "\\u0000" in json.dumps(obj):  # PostgreSQL stores no NUL in JSON
            raise bad_request(f"Invalid grader: {param} holds a NUL character (\\u0000).", param=param)
        grader_json, _ = _split(obj, param)
        checked = graders.check(session=session, settings=settings, key=key, obj=grader_json, param=param)
        if isinstance(checked.grader, TextSimilarityGrader) and checked.grader.pass_threshold is None:
            raise bad_request(f"Invalid grader: {param}.pass_threshold is required: a text_similarity criterion "
                              "passes when its score reaches it.", param=f"{param}.pass_threshold",
                              code="missing_required_parameter")
        stored.append({**{k: v for k, v in obj.items() if k != "id"}, "id": f"{checked.grader.label}-{uuid.uuid4()}"})
    return stored


def recheck(*, session: Session, settings: Settings, key: ApiKey, stored: list[dict[str, Any]]) -> None:
    """An eval's stored criteria can still run for `key` (a judge model deleted, python graders switched off since
    the eval was made): a 400 naming the criterion otherwise."""
    for i, obj in enumerate(stored):
        grader_json, _ = _split(obj, f"{PARAM}[{i}]")
        graders.check(session=session, settings=settings, key=key, obj=grader_json, param=f"{PARAM}[{i}]")


def parse(stored: list[dict[str, Any]]) -> list[Criterion]:
    """The stored criteria as the worker grades with them (checked when they were stored)."""
    parsed = []
    for obj in stored:
        grader_json, threshold = _split(obj, PARAM)
        parsed.append(Criterion(str(obj["id"]), validate_grader(grader_json), threshold))
    return parsed
