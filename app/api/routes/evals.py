"""Evals: `/v1/evals`, their runs and the runs' output items, as OpenAI's Evals API (and the `openai` package's
`client.evals`) has them. A run is queued here and executed by a worker."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import PathId, QueryId, StrictRoute
from app.schemas.evals import (
    EvalCreate,
    EvalDeleted,
    EvalList,
    EvalObject,
    EvalRunDeleted,
    EvalRunList,
    EvalRunObject,
    EvalUpdate,
    OutputItemList,
    OutputItemObject,
    RunCreate,
    RunStatusName,
)
from app.services import evals

router = APIRouter(prefix="/evals", tags=["evals"], route_class=StrictRoute)

Limit = Annotated[int, Query(ge=1, le=100)]
Order = Literal["asc", "desc"]


@router.post("")
def create_eval(body: EvalCreate, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> EvalObject:
    """An item schema and testing criteria (graders); each criterion is checked and given an id."""
    return evals.eval_object(evals.create_eval(session=session, settings=ctx.settings, key=key, payload=body))


@router.get("")
def list_evals(session: SessionDep, key: CurrentKey, after: QueryId = None, limit: Limit = 20, order: Order = "asc",
               order_by: Literal["created_at"] = "created_at") -> EvalList:  # noqa: ARG001 (the one order kept)
    """Paged with `after`, by creation time (`order_by=updated_at` is not offered: ids carry the creation order)."""
    return evals.list_evals(session=session, key=key, after=after, limit=limit, order=order)


@router.get("/{eval_id}")
def retrieve_eval(eval_id: PathId, session: SessionDep, key: CurrentKey) -> EvalObject:
    return evals.eval_object(evals.get_eval(session=session, key=key, eval_id=eval_id))


@router.post("/{eval_id}")
def update_eval(eval_id: PathId, body: EvalUpdate, session: SessionDep, key: CurrentKey) -> EvalObject:
    """Rename it or replace its metadata."""
    return evals.eval_object(evals.update_eval(session=session, key=key, eval_id=eval_id, payload=body))


@router.delete("/{eval_id}")
def delete_eval(eval_id: PathId, session: SessionDep, key: CurrentKey) -> EvalDeleted:
    evals.delete_eval(session=session, key=key, eval_id=eval_id)
    return EvalDeleted(deleted=True, eval_id=eval_id)


@router.post("/{eval_id}/runs")
def create_run(eval_id: PathId, body: RunCreate, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> EvalRunObject:
    """Queue a run: a worker samples the model on every item and grades the answers."""
    row = evals.create_run(session=session, settings=ctx.settings, broker=ctx.broker, key=key, eval_id=eval_id,
                           payload=body)
    return evals.run_object(row)


@router.get("/{eval_id}/runs")
def list_runs(eval_id: PathId, session: SessionDep, key: CurrentKey, after: QueryId = None, limit: Limit = 20,
              order: Order = "asc", status: RunStatusName | None = None) -> EvalRunList:
    return evals.list_runs(session=session, key=key, eval_id=eval_id, after=after, limit=limit, order=order,
                           status=status)


@router.get("/{eval_id}/runs/{run_id}")
def retrieve_run(eval_id: PathId, run_id: PathId, session: SessionDep, key: CurrentKey) -> EvalRunObject:
    return evals.run_object(evals.get_run(session=session, key=key, eval_id=eval_id, run_id=run_id))


@router.post("/{eval_id}/runs/{run_id}/cancel")
@router.post("/{eval_id}/runs/{run_id}")
def cancel_run(eval_id: PathId, run_id: PathId, session: SessionDep, key: CurrentKey) -> EvalRunObject:
    """Cancel (at both paths OpenAI has used): a queued run at once, an in-progress one between two batches."""
    return evals.run_object(evals.cancel_run(session=session, key=key, eval_id=eval_id, run_id=run_id))


@router.delete("/{eval_id}/runs/{run_id}")
def delete_run(eval_id: PathId, run_id: PathId, session: SessionDep, key: CurrentKey) -> EvalRunDeleted:
    evals.delete_run(session=session, key=key, eval_id=eval_id, run_id=run_id)
    return EvalRunDeleted(deleted=True, run_id=run_id)


@router.get("/{eval_id}/runs/{run_id}/output_items")
def list_output_items(eval_id: PathId, run_id: PathId, session: SessionDep, key: CurrentKey,
                      after: QueryId = None, limit: Limit = 20, order: Order = "asc",
                      status: Literal["pass", "fail"] | None = None) -> OutputItemList:
    return evals.list_output_items(session=session, key=key, eval_id=eval_id, run_id=run_id, after=after,
                                   limit=limit, order=order, status=status)


@router.get("/{eval_id}/runs/{run_id}/output_items/{output_item_id}")
def retrieve_output_item(eval_id: PathId, run_id: PathId, output_item_id: PathId, session: SessionDep,
                         key: CurrentKey) -> OutputItemObject:
    row = evals.get_output_item(session=session, key=key, eval_id=eval_id, run_id=run_id,
                                output_item_id=output_item_id)
    return evals.output_item_object(row)
