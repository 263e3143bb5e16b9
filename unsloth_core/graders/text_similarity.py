"""text_similarity: a similarity metric of the rendered `input` against `reference` (see `metrics`, `meteor`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from unsloth_core.graders import metrics
from unsloth_core.graders.errors import GraderUnavailableError
from unsloth_core.graders.meteor import meteor
from unsloth_core.graders.result import GradeError, GradeResult
from unsloth_core.graders.schema import TextSimilarityGrader
from unsloth_core.graders.template import TemplateFieldError, render

METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": metrics.fuzzy_match,
    "bleu": metrics.bleu,
    "gleu": metrics.gleu,
    "meteor": meteor,
    **{f"rouge_{n}": partial(metrics.rouge, kind=str(n)) for n in range(1, 6)},
    "rouge_l": partial(metrics.rouge, kind="l"),
}


def grade_text_similarity(grader: TextSimilarityGrader, namespaces: Sequence[dict[str, Any]],
                          embed: metrics.Embed | None) -> list[GradeResult]:
    if grader.evaluation_metric == "cosine" and embed is None:
        raise GraderUnavailableError(
            f"text_similarity grader {grader.label!r} uses 'cosine', which needs an embedding model, and none was "
            "given: pass embed=... or choose another evaluation_metric")
    results = [GradeResult(grader.label, grader.type, 0.0) for _ in namespaces]
    pairs: list[tuple[int, str, str]] = []
    for i, ns in enumerate(namespaces):
        try:
            pairs.append((i, render(grader.input, ns), render(grader.reference, ns)))
        except TemplateFieldError as e:
            results[i].errors.append(GradeError(e.code, str(e)))
    try:
        scores = _scores(grader.evaluation_metric, [(text, ref) for _, text, ref in pairs], embed)
    except GraderUnavailableError:
        raise
    except Exception as e:  # an embedding model that failed, a metric library's error
        for i, _, _ in pairs:
            results[i].errors.append(GradeError("other_error", f"{grader.evaluation_metric}: {type(e).__name__}: {e}"))
        return results
    for (i, _, _), score in zip(pairs, scores):
        results[i].score = score
        results[i].passed = None if grader.pass_threshold is None else score >= grader.pass_threshold
    return results


def _scores(metric: str, pairs: list[tuple[str, str]], embed: metrics.Embed | None) -> list[float]:
    if metric != "cosine":
        return [METRICS[metric](text, reference) for text, reference in pairs]
    if not pairs:
        return []
    assert embed is not None
    vectors = list(embed([text for pair in pairs for text in pair]))  # one call for the whole batch
    if len(vectors) != 2 * len(pairs):
        raise ValueError(f"the embedding model returned {len(vectors)} vectors for {2 * len(pairs)} texts")
    return [metrics.cosine(vectors[2 * k], vectors[2 * k + 1]) for k in range(len(pairs))]
