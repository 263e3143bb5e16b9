"""Helpers every service uses: ownership filters and cursor paging over time-ordered ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.db.models import ApiKey

T = TypeVar("T")


def owned(query: Select[Any], owner_column: InstrumentedAttribute[Any], key: ApiKey) -> Select[Any]:
    """Restrict to the key's own rows; an admin key sees every row."""
    return query if key.is_admin else query.where(owner_column == key.id)


def page(session: Session, query: Select[Any], id_column: InstrumentedAttribute[str], *, after: str | None,
         limit: int, descending: bool = True) -> tuple[Sequence[Any], bool]:
    """One page after the cursor `after` (an id), and whether more follow. Ids sort by creation time."""
    if after:
        query = query.where(id_column < after if descending else id_column > after)
    query = query.order_by(id_column.desc() if descending else id_column.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit
