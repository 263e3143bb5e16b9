"""Synthetic data: deterministic by seed, and valid training files in the formats it claims."""

from __future__ import annotations

from pathlib import Path

from unsloth_core.data import validate_file
from unsloth_core.data.synthetic import (
    arithmetic_facts,
    arithmetic_rows,
    fact_rows,
    key_value_rows,
    made_up_facts,
    preference_rows,
    write_jsonl,
)


def test_deterministic_by_seed() -> None:
    assert fact_rows(20, seed=1) == fact_rows(20, seed=1)
    assert fact_rows(20, seed=1) != fact_rows(20, seed=2)
    assert key_value_rows(5, seed=0) == key_value_rows(5, seed=0)


def test_made_up_facts_are_distinct_and_answerable() -> None:
    facts = made_up_facts(300, seed=0)
    assert len({f.question for f in facts}) == 300
    capital = facts[0]
    assert capital.question.startswith("What is the capital of ") and capital.answer != capital.wrong_answer
    for f in arithmetic_facts(50):
        a, op, b = f.question.removeprefix("What is ").removesuffix("?").split()
        x, y = int(a), int(b)
        assert f.answer == f"{a} {op} {b} = {x + y if op == '+' else x - y if op == '-' else x * y}."
        assert f.answer != f.wrong_answer


def test_rows_are_valid_files_of_their_format(tmp_path: Path) -> None:
    sft = write_jsonl(tmp_path / "sft.jsonl", fact_rows(30, system="You know Zorbania.") + arithmetic_rows(10)
                      + key_value_rows(10))
    report = validate_file(sft, purpose="sft")
    assert report.ok and report.format == "chat" and report.n_examples == 50
    for style in ("preference", "chosen_rejected"):
        path = write_jsonl(tmp_path / f"{style}.jsonl", preference_rows(made_up_facts(10), style=style))
        report = validate_file(path, purpose="dpo")
        assert report.ok and report.format == style and report.n_examples == 10
