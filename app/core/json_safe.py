"""Values made storable as JSON in either database: PostgreSQL's JSONB refuses a NUL in a string (a byte-level model
can write one) and no database stores a non-finite number as JSON. Model output passes through here before it is
kept (rollouts, eval output items)."""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any, max_text: int | None = None) -> Any:
    """A copy with NULs replaced (U+FFFD), non-finite floats as None, strings cut to `max_text` characters."""
    if isinstance(value, str):
        text = value.replace("\x00", "\ufffd")
        return text[:max_text] if max_text is not None else text
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v, max_text) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v, max_text) for v in value]
    return value
