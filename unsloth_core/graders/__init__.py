"""OpenAI's graders: string_check, text_similarity, score_model, label_model, python (sandboxed) and multi.

One module for GRPO's rewards, `/v1/fine_tuning/alpha/graders/{validate,run}` and evaluations. Importing it loads
neither torch nor the metric libraries (those load on first use), so the API process validates graders cheaply.

    grader = validate_grader(json_object)             # GraderValidationError names the field path
    result = grade(grader, "model output", {"answer": "Paris"}, judge=..., allow_python=settings.allow_python)
    results = grade_batch(grader, completions, rows)   # GRPO: one call per step
    missing_item_fields(grader, training_line)         # the upload validator
    judge = LocalJudge(resolve)                        # the worker's judge: models run in this process (torch)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from unsloth_core.graders.errors import GraderError, GraderUnavailableError, GraderValidationError
from unsloth_core.graders.grade import (
    Requirements,
    grade,
    grade_batch,
    item_fields,
    missing_item_fields,
    requirements,
)
from unsloth_core.graders.judge import Judge, JudgeRequest
from unsloth_core.graders.metrics import Embed
from unsloth_core.graders.result import GradeError, GradeResult
from unsloth_core.graders.sample import Sample
from unsloth_core.graders.sandbox import SandboxConfig, SandboxLimits
from unsloth_core.graders.schema import (
    Grader,
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    TextSimilarityGrader,
    validate_grader,
)

if TYPE_CHECKING:
    from unsloth_core.graders.local_judge import JudgeModel, LocalJudge, UnknownJudgeModelError

# Loaded on first use: they import torch and the engine, which validating a grader must not.
_LAZY = {"JudgeModel", "LocalJudge", "UnknownJudgeModelError"}

__all__ = [
    "Embed",
    "GradeError",
    "GradeResult",
    "Grader",
    "GraderError",
    "GraderUnavailableError",
    "GraderValidationError",
    "Judge",
    "JudgeModel",
    "JudgeRequest",
    "LabelModelGrader",
    "LocalJudge",
    "MultiGrader",
    "PythonGrader",
    "Requirements",
    "Sample",
    "SandboxConfig",
    "SandboxLimits",
    "ScoreModelGrader",
    "StringCheckGrader",
    "TextSimilarityGrader",
    "UnknownJudgeModelError",
    "grade",
    "grade_batch",
    "item_fields",
    "missing_item_fields",
    "requirements",
    "validate_grader",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("unsloth_core.graders.local_judge"), name)
    raise AttributeError(f"module 'unsloth_core.graders' has no attribute {name!r}")
