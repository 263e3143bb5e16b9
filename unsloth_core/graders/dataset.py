"""A dataset checked against a grader: every `item.` field the grader's templates read, on every line.

OpenAI refuses a reinforcement job whose training or validation rows lack a field the grader names; so do we, line
by line, before anything trains (a missing field would otherwise score that row 0 on every step, silently).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from unsloth_core.graders.grade import item_fields, missing_item_fields
from unsloth_core.graders.schema import Grader, validate_grader


def missing_fields_by_line(source: str | Path, grader: Grader | Mapping[str, Any]) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, the `item.` paths it lacks) for each line that lacks some. Lines that are blank or not
    JSON objects are skipped: the file's own validation reports those."""
    checked = validate_grader(grader)
    if not item_fields(checked):
        return
    with Path(source).open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if isinstance(row, dict):
                missing = missing_item_fields(checked, row)
                if missing:
                    yield number, missing
