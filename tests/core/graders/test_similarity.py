"""string_check and text_similarity against scores worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from unsloth_core.graders import GraderUnavailableError, grade

HYP, REF = "the cat sat on the mat", "the cat sat on a mat"


def check(operation: str, text: str, reference: str) -> float:
    return grade({"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.ref}}",
                  "operation": operation}, text, {"ref": reference}).score


def test_string_check_operations() -> None:
    assert (check("eq", "Paris", "Paris"), check("eq", "Paris", "paris")) == (1.0, 0.0)
    assert (check("ne", "Paris", "paris"), check("ne", "Paris", "Paris")) == (1.0, 0.0)
    # like / ilike: OpenAI's "input contains reference", not SQL patterns ('%' is a plain character).
    assert (check("like", "The capital is Paris.", "Paris"), check("like", "The capital is PARIS.", "Paris")) == (1, 0)
    assert check("like", "Paris", "P%s") == 0.0
    assert check("ilike", "The capital is PARIS.", "paris") == 1.0


def similarity(metric: str, text: str = HYP, reference: str = REF, **extra: object) -> float:
    grader = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.ref}}",
              "evaluation_metric": metric, **extra}
    result = grade(grader, text, {"ref": reference})
    assert not result.errors
    return result.score


def test_bleu_gleu_rouge() -> None:
    # n-gram matches of HYP against REF (6 tokens each, clipped counts): 1-grams 5/6, 2-grams 3/5 (the cat, cat sat,
    # sat on), 3-grams 2/4, 4-grams 1/3; equal lengths, so no brevity penalty.
    assert similarity("bleu") == pytest.approx((5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-9)  # 0.5373
    # GLEU: matched n-grams of all orders over the larger of the two totals: (5+3+2+1) / (6+5+4+3).
    assert similarity("gleu") == pytest.approx(11 / 18)
    # ROUGE-n F-measure; precision = recall here, so F is the overlap ratio.
    assert [similarity(f"rouge_{n}") for n in range(1, 6)] == pytest.approx([5 / 6, 3 / 5, 2 / 4, 1 / 3, 0.0])
    # ROUGE-L: the longest common subsequence "the cat sat on mat" has 5 of 6 tokens on each side.
    assert similarity("rouge_l") == pytest.approx(5 / 6)
    assert similarity("bleu", HYP, HYP) == pytest.approx(1.0)


def test_fuzzy_match() -> None:
    # kitten/sitting: longest common subsequence "ittn" (4), so the InDel distance is 6 + 7 - 2*4 = 5 and the
    # normalised similarity 1 - 5/13 = 8/13; WRatio keeps that (lengths within 1.5x, one token each).
    assert similarity("fuzzy_match", "kitten", "sitting") == pytest.approx(8 / 13)
    assert similarity("fuzzy_match", "Paris!", "paris") == 1.0  # lower case, punctuation dropped


def test_meteor_uses_stems_and_wordnet_synonyms() -> None:
    # All three words match (the, barked exactly; hound -> dog through WordNet) in one chunk: precision = recall
    # = 1, fragmentation 1/3, penalty 0.5 * (1/3)^3, score 1 - 1/54.
    assert similarity("meteor", "the hound barked", "the dog barked") == pytest.approx(53 / 54)
    assert similarity("meteor", "the cats barked", "the cat barked") == pytest.approx(53 / 54)  # Porter stems
    # Without a synonym: 2 of 3 match in 2 chunks: F = 2/3, penalty 0.5 * (2/2)^3, score 1/3.
    assert similarity("meteor", "the wolf barked", "the dog barked") == pytest.approx(1 / 3)


def test_cosine_needs_an_embedding_model() -> None:
    grader = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.ref}}",
              "evaluation_metric": "cosine", "pass_threshold": 0.8}
    with pytest.raises(GraderUnavailableError, match="needs an embedding model"):
        grade(grader, "a", {"ref": "b"})
    calls: list[list[str]] = []

    def embed(texts: Sequence[str]) -> list[list[float]]:
        calls.append(list(texts))
        return [{"a": [1.0, 0.0], "b": [1.0, 1.0]}[t] for t in texts]

    result = grade(grader, "a", {"ref": "b"}, embed=embed)
    assert result.score == pytest.approx(1 / math.sqrt(2)) and result.passed is False and calls == [["a", "b"]]


def test_pass_threshold_and_missing_field() -> None:
    grader = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.ref}}",
              "evaluation_metric": "rouge_1", "pass_threshold": 0.8}
    assert grade(grader, HYP, {"ref": REF}).passed is True
    result = grade(grader, HYP, {"reference": REF})
    assert result.score == 0.0 and result.errors[0].code == "invalid_variable_error"
    assert result.errors[0].message.startswith("item.ref: missing")
    assert result.error_flags()["invalid_variable_error"] is True
