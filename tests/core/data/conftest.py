"""Tokenizers for the data tests: a tiny byte-level one built in code (fast), and SmolLM2's real one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_tiny_tokenizer
from unsloth_core.data.sft import IGNORE_INDEX, TokenizedExample
from unsloth_core.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures"

@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def smol_tokenizer(smollm_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm_dir)


def trained_runs(tokenizer: Tokenizer, example: TokenizedExample) -> list[str]:
    """The text of each run of consecutive tokens that get loss; also checks that every label is its token's id."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels):
        assert label in (token, IGNORE_INDEX)
        if label != IGNORE_INDEX:
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return [tokenizer.decode(run) for run in runs]
