"""Helpers every service uses: ownership filters, cursor paging over time-ordered ids, Idempotency-Key lookup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import Select, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from app.core.errors import APIError
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


def by_idempotency_key(session: Session, model: type[T], key: ApiKey, idempotency_key: str, digest: str) -> T | None:
    """The key's earlier object created with this Idempotency-Key (`model` has owner_id, idempotency_key and
    request_hash columns); a 422 when that key came with a different body."""
    table: Any = model
    existing: Any = session.scalar(select(table).where(table.owner_id == key.id,
                                                       table.idempotency_key == idempotency_key))
    if existing is not None and existing.request_hash != digest:
        raise APIError(422, "This Idempotency-Key was already used with a different request body.",
                       param="Idempotency-Key", code="idempotency_key_reused")
    return cast(T | None, existing)
