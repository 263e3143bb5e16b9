"""Exports: `/v1/exports`, a collection of its own (as fine-tuning jobs are) with the model id in the body, since
model ids hold `/` and `:` and `/v1/models/{model}` matches the rest of the path."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import IdempotencyKey, PathId, QueryId, RetryCount, StrictRoute
from app.schemas.exports import ExportCreate, ExportDeleted, ExportList, ExportObject
from app.services import exports

router = APIRouter(prefix="/exports", tags=["exports"], route_class=StrictRoute)


@router.post("")
def create_export(body: ExportCreate, ctx: CtxDep, session: SessionDep, key: CurrentKey,
                  idempotency_key: IdempotencyKey = None, retry_count: RetryCount = None) -> ExportObject:
    """Queue an export of a fine-tune, a checkpoint or a base model; a worker merges, converts and checks it."""
    row = exports.create_export(session=session, settings=ctx.settings, broker=ctx.broker, key=key, payload=body,
                                idempotency_key=idempotency_key, retry_count=retry_count)
    return exports.export_object(row)


@router.get("")
def list_exports(session: SessionDep, key: CurrentKey, after: QueryId = None,
                 limit: Annotated[int, Query(ge=1, le=100)] = 20, model: QueryId = None) -> ExportList:
    """Newest first, paged with `after`; `model` keeps one model's exports."""
    return exports.list_exports(session=session, key=key, after=after, limit=limit, model=model)


@router.get("/{export_id}")
def retrieve_export(export_id: PathId, session: SessionDep, key: CurrentKey) -> ExportObject:
    return exports.export_object(exports.get_export(session=session, key=key, export_id=export_id))


@router.post("/{export_id}/cancel")
def cancel_export(export_id: PathId, session: SessionDep, key: CurrentKey) -> ExportObject:
    return exports.export_object(exports.cancel_export(session=session, key=key, export_id=export_id))


@router.delete("/{export_id}")
def delete_export(export_id: PathId, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> ExportDeleted:
    exports.delete_export(session=session, settings=ctx.settings, key=key, export_id=export_id)
    return ExportDeleted(id=export_id, deleted=True)
