"""string_check: 1 or 0 from a string comparison of the rendered `input` and `reference`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from unsloth_core.graders.result import GradeError, GradeResult
from unsloth_core.graders.schema import StringCheckGrader
from unsloth_core.graders.template import TemplateFieldError, render

# OpenAI's definitions: `like` and `ilike` test containment (input contains reference), not SQL LIKE patterns.
OPERATIONS: dict[str, Callable[[str, str], bool]] = {
    "eq": lambda text, reference: text == reference,
    "ne": lambda text, reference: text != reference,
    "like": lambda text, reference: reference in text,
    "ilike": lambda text, reference: reference.casefold() in text.casefold(),
}


def grade_string_check(grader: StringCheckGrader, namespaces: Sequence[dict[str, Any]]) -> list[GradeResult]:
    results = []
    for ns in namespaces:
        result = GradeResult(grader.label, grader.type, 0.0)
        try:
            text, reference = render(grader.input, ns), render(grader.reference, ns)
        except TemplateFieldError as e:
            result.errors.append(GradeError(e.code, str(e)))
        else:
            result.passed = OPERATIONS[grader.operation](text, reference)
            result.score = 1.0 if result.passed else 0.0
        results.append(result)
    return results
