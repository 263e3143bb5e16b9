"""The entry points: grade one sample or a batch with any grader, and what a grader needs from its data and server.

GRPO grades every completion of a step in one `grade_batch` call: model graders make one judge call for the batch,
python graders run the batch in one sandboxed process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unsloth_core.graders.formula import FormulaError
from unsloth_core.graders.judge import Judge
from unsloth_core.graders.metrics import Embed
from unsloth_core.graders.model_grader import grade_model
from unsloth_core.graders.python_grader import grade_python
from unsloth_core.graders.result import GradeError, GradeResult
from unsloth_core.graders.sample import Sample, as_sample
from unsloth_core.graders.sandbox import SandboxConfig
from unsloth_core.graders.schema import (
    Grader,
    LabelModelGrader,
    MultiGrader,
    PythonGrader,
    ScoreModelGrader,
    StringCheckGrader,
    SubGrader,
    TextSimilarityGrader,
    validate_grader,
)
from unsloth_core.graders.string_check import grade_string_check
from unsloth_core.graders.template import TemplateFieldError, parse_template, resolve
from unsloth_core.graders.text_similarity import grade_text_similarity


def grade(grader: Grader | Mapping[str, Any], sample: Sample | str, item: Mapping[str, Any] | None = None, *,
          judge: Judge | None = None, embed: Embed | None = None, allow_python: bool = False,
          sandbox: SandboxConfig | None = None) -> GradeResult:
    """Grade one sample (a `Sample`, or the model's text) against its dataset item. See `grade_batch`."""
    return grade_batch(grader, [sample], [item], judge=judge, embed=embed, allow_python=allow_python,
                       sandbox=sandbox)[0]


def grade_batch(grader: Grader | Mapping[str, Any], samples: Sequence[Sample | str],
                items: Sequence[Mapping[str, Any] | None], *, judge: Judge | None = None, embed: Embed | None = None,
                allow_python: bool = False, sandbox: SandboxConfig | None = None) -> list[GradeResult]:
    """Grade samples[k] against items[k] for every k; one GradeResult each, in order.

    Args:
        grader: OpenAI's grader JSON or a validated grader (GraderValidationError when the JSON is not one).
        judge: runs score_model / label_model prompts (see `judge`); needed only by those.
        embed: the embedding model for text_similarity's `cosine`.
        allow_python: python graders run only when True (the server's setting); else GraderUnavailableError.
        sandbox: the python sandbox's limits and isolation policy (defaults: `SandboxConfig()`).

    A sample's problem (a missing field, a judge's unreadable answer, the user's code failing) scores that sample 0
    and is recorded in its `errors`; GraderUnavailableError is raised only when the grader cannot run at all.
    """
    checked = validate_grader(grader)
    if len(samples) != len(items):
        raise ValueError(f"{len(samples)} samples but {len(items)} items")
    namespaces = [{"item": dict(item) if item is not None else None, "sample": as_sample(sample).namespace()}
                  for sample, item in zip(samples, items)]
    if isinstance(checked, MultiGrader):
        return _grade_multi(checked, namespaces, judge, embed, allow_python, sandbox)
    return _grade_one(checked, namespaces, judge, embed, allow_python, sandbox)


def _grade_one(grader: SubGrader, namespaces: list[dict[str, Any]], judge: Judge | None, embed: Embed | None,
               allow_python: bool, sandbox: SandboxConfig | None) -> list[GradeResult]:
    if isinstance(grader, StringCheckGrader):
        return grade_string_check(grader, namespaces)
    if isinstance(grader, TextSimilarityGrader):
        return grade_text_similarity(grader, namespaces, embed)
    if isinstance(grader, ScoreModelGrader | LabelModelGrader):
        return grade_model(grader, namespaces, judge)
    return grade_python(grader, namespaces, allow_python=allow_python, sandbox=sandbox)


def _grade_multi(grader: MultiGrader, namespaces: list[dict[str, Any]], judge: Judge | None, embed: Embed | None,
                 allow_python: bool, sandbox: SandboxConfig | None) -> list[GradeResult]:
    subs = {key: _grade_one(sub, namespaces, judge, embed, allow_python, sandbox)
            for key, sub in grader.graders.items()}
    formula = grader.formula
    results = []
    for k in range(len(namespaces)):
        result = GradeResult(grader.label, grader.type, 0.0, sub_scores={key: subs[key][k].score for key in subs})
        for key, sub_results in subs.items():
            sub = sub_results[k]
            result.errors.extend(GradeError(e.code, e.message, key) for e in sub.errors)
            if sub.details:
                result.details[key] = sub.details
        try:
            result.score = formula.evaluate(result.sub_scores)
        except FormulaError as e:
            result.errors.append(GradeError("other_error", str(e)))
        results.append(result)
    return results


@dataclass(frozen=True)
class Requirements:
    """What a grader needs from the server: python allowed, judge models by name, an embedding model."""

    python: bool
    judge_models: tuple[str, ...]
    embed: bool


def requirements(grader: Grader | Mapping[str, Any]) -> Requirements:
    checked = validate_grader(grader)
    subs: list[SubGrader] = list(checked.graders.values()) if isinstance(checked, MultiGrader) else [checked]
    return Requirements(
        python=any(isinstance(sub, PythonGrader) for sub in subs),
        judge_models=tuple(dict.fromkeys(sub.model for sub in subs if isinstance(sub, ScoreModelGrader |
                                                                                   LabelModelGrader))),
        embed=any(isinstance(sub, TextSimilarityGrader) and sub.evaluation_metric == "cosine" for sub in subs),
    )


def item_fields(grader: Grader | Mapping[str, Any]) -> list[str]:
    """Every `item.` path the grader's templates reference (`item.answer`, `item.tools[0].name`), in order of first
    use. A python grader reads `item` in its own code, which is not analysed: its fields are not listed."""
    paths = (str(ref) for source in validate_grader(grader).strings()
             for ref in parse_template(source).references if ref.namespace == "item")
    return list(dict.fromkeys(paths))


def missing_item_fields(grader: Grader | Mapping[str, Any], item: Mapping[str, Any]) -> list[str]:
    """The referenced `item.` paths this dataset row lacks, each as far as it resolved (`item.answer.donors`).
    Empty when the row has them all: what the upload validator checks on every training line."""
    missing: dict[str, None] = {}
    namespaces = {"item": item}
    for source in validate_grader(grader).strings():
        for ref in parse_template(source).references:
            if ref.namespace == "item":
                try:
                    resolve(ref, namespaces)
                except TemplateFieldError as e:
                    missing[e.field] = None
    return list(missing)
