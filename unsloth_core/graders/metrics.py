"""The text_similarity metrics, each computed by the library that defines it; all in [0, 1].

| metric        | computed by                                                                                   |
|---------------|-----------------------------------------------------------------------------------------------|
| fuzzy_match   | rapidfuzz `fuzz.WRatio` with `utils.default_process` (lower case, punctuation dropped) / 100: |
|               | the call OpenAI's graders guide itself writes for fuzzy matching                              |
| bleu          | sacrebleu `sentence_bleu` (its 13a tokenizer, exponential smoothing) / 100                    |
| gleu          | nltk `sentence_gleu` (Google's sentence BLEU, 1- to 4-grams) over sacrebleu's 13a tokens, as  |
|               | Hugging Face evaluate's `google_bleu` computes it                                             |
| meteor        | nltk `meteor_score`, with WordNet synonyms: see `meteor`                                      |
| rouge_1..5, l | Google's rouge-score `RougeScorer` F-measure (no stemming; its tokenizer keeps a-z and 0-9    |
|               | only, so text in other scripts scores 0)                                                      |
| cosine        | cosine of the two texts' embeddings, from an embedding model the caller passes                |

The libraries are imported on first use, so validating graders (the API process) loads none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

Embed = Callable[[Sequence[str]], Sequence[Sequence[float]]]
"""An embedding model: texts in, one vector each out (for `cosine`)."""


def fuzzy_match(text: str, reference: str) -> float:
    from rapidfuzz import fuzz, utils

    return float(fuzz.WRatio(text, reference, processor=utils.default_process)) / 100.0


def bleu(text: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(text, [reference]).score) / 100.0


def gleu(text: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    tokenize = _tokenizer_13a()
    return float(sentence_gleu([tokenize(reference).split()], tokenize(text).split()))


@lru_cache(maxsize=1)
def _tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def rouge(text: str, reference: str, kind: str) -> float:
    """kind: '1'..'5' (n-gram overlap) or 'l' (longest common subsequence)."""
    key = f"rouge{kind.upper() if kind == 'l' else kind}"
    return float(_rouge_scorer(key).score(reference, text)[key].fmeasure)


@lru_cache(maxsize=8)
def _rouge_scorer(key: str) -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer([key], use_stemmer=False)


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    import numpy as np

    u, v = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if u.shape != v.shape or u.ndim != 1:
        raise ValueError(f"the embeddings' shapes differ or are not vectors: {u.shape} and {v.shape}")
    norm = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(u @ v) / norm if norm > 0 else 0.0
