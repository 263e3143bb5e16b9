"""Synthetic training data, deterministic by seed, for tests, benchmarks and demos.

Made-up facts are the useful case: a model cannot know "The capital of Zorbania is Quillfort." before training, so
answering it afterwards shows that fine-tuning worked. Every generator returns rows in the file formats of
`formats.py` (chat `messages` for SFT, OpenAI `preference` or `chosen_rejected` for DPO); `write_jsonl` saves them.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Row = dict[str, Any]

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "k", "kr", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th",
           "v", "w", "z", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
_CODAS = ["", "", "l", "n", "r", "s", "th", "x"]
_COUNTRY_ENDS = ["ania", "ia", "istan", "land", "ovia", "onia", "ar"]
_CITY_ENDS = ["fort", "ton", "burg", "haven", "mere", "grad", "field", "port"]
_THINGS = ["crown", "mark", "shell", "florin", "bead", "talon"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


@dataclass(frozen=True)
class Fact:
    """A question with its right answer and a plausible wrong one (for preference pairs)."""

    question: str
    answer: str
    wrong_answer: str


def made_up_facts(n: int, seed: int = 0) -> list[Fact]:
    """`n` facts about invented countries (capital, currency, founding year), each country used once."""
    rng = random.Random(f"facts:{seed}")
    countries: dict[str, None] = {}  # an ordered set: same seed, same order
    while len(countries) < n:
        countries[(_word(rng, rng.randint(1, 2)) + rng.choice(_COUNTRY_ENDS)).capitalize()] = None
    facts = []
    for i, country in enumerate(countries):
        kind = i % 3
        if kind == 0:
            right, wrong = ((_word(rng, rng.randint(1, 2)) + rng.choice(_CITY_ENDS)).capitalize() for _ in range(2))
            facts.append(Fact(f"What is the capital of {country}?", f"The capital of {country} is {right}.",
                              f"The capital of {country} is {wrong}."))
        elif kind == 1:
            right, wrong = (_word(rng, 1) + rng.choice(_THINGS) for _ in range(2))
            facts.append(Fact(f"What currency is used in {country}?", f"The currency of {country} is the {right}.",
                              f"The currency of {country} is the {wrong}."))
        else:
            year = rng.randint(1100, 1990)
            facts.append(Fact(f"When was {country} founded?", f"{country} was founded in {year}.",
                              f"{country} was founded in {year + rng.choice([-1, 1]) * rng.randint(3, 200)}."))
    return facts


def arithmetic_facts(n: int, seed: int = 0, max_value: int = 99) -> list[Fact]:
    """Sums, differences and products of two numbers up to `max_value`."""
    rng = random.Random(f"arithmetic:{seed}")
    facts = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_value), rng.randint(0, max_value), rng.choice("+-*")
        result = a + b if op == "+" else a - b if op == "-" else a * b
        wrong = result + rng.choice([-1, 1]) * rng.randint(1, 10)
        facts.append(Fact(f"What is {a} {op} {b}?", f"{a} {op} {b} = {result}.", f"{a} {op} {b} = {wrong}."))
    return facts


def key_value_facts(n: int, seed: int = 0, n_pairs: int = 5) -> list[Fact]:
    """In-context recall: the question lists `n_pairs` made-up keys with numbers and asks for one of them."""
    rng = random.Random(f"kv:{seed}")
    facts = []
    for _ in range(n):
        keys: dict[str, None] = {}
        while len(keys) < n_pairs:
            keys[_word(rng, 2)] = None
        values = {k: rng.randint(10, 999) for k in keys}
        key = rng.choice(list(values))
        wrong = rng.choice([v for k, v in values.items() if k != key] or [values[key] + 1])
        listing = ", ".join(f"{k}={v}" for k, v in values.items())
        facts.append(Fact(f"Remember these codes: {listing}. What is the code for {key}?",
                          f"The code for {key} is {values[key]}.", f"The code for {key} is {wrong}."))
    return facts


def chat_rows(facts: Iterable[Fact], system: str | None = None) -> list[Row]:
    """SFT rows in the `chat` format: one question and its right answer each."""
    head = [{"role": "system", "content": system}] if system else []
    return [{"messages": [*head, {"role": "user", "content": f.question}, {"role": "assistant", "content": f.answer}]}
            for f in facts]


def preference_rows(facts: Iterable[Fact], style: Literal["preference", "chosen_rejected"] = "preference",
                    system: str | None = None) -> list[Row]:
    """DPO rows, chosen = the right answer, rejected = the wrong one; in OpenAI's shape (`preference`) or as
    `prompt`/`chosen`/`rejected` strings."""
    head = [{"role": "system", "content": system}] if system else []
    rows = []
    for f in facts:
        if style == "preference":
            rows.append({"input": {"messages": [*head, {"role": "user", "content": f.question}]},
                         "preferred_output": [{"role": "assistant", "content": f.answer}],
                         "non_preferred_output": [{"role": "assistant", "content": f.wrong_answer}]})
        else:
            rows.append({"prompt": f.question, "chosen": f.answer, "rejected": f.wrong_answer})
    return rows


def fact_rows(n: int, seed: int = 0, system: str | None = None) -> list[Row]:
    """The usual memorisation set: `n` made-up facts as chat rows."""
    return chat_rows(made_up_facts(n, seed), system)


def arithmetic_rows(n: int, seed: int = 0, max_value: int = 99) -> list[Row]:
    return chat_rows(arithmetic_facts(n, seed, max_value))


def key_value_rows(n: int, seed: int = 0, n_pairs: int = 5) -> list[Row]:
    return chat_rows(key_value_facts(n, seed, n_pairs))


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[Row]) -> Path:
    """One JSON object per line, UTF-8, newline-terminated; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
