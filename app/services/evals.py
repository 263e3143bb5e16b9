"""Evals (OpenAI's Evals API, the subset its fine-tuning users relied on): evals (an item schema and testing
criteria), their runs against a model this server serves, and each run's graded output items.

A run is checked whole before anything is queued, every refusal a 400 naming the field: the model is one the key may
use (`data_source.model`), the file is the key's and readable (`data_source.source.id`), every item is an object
holding what the eval's item schema requires, the input messages' templates parse and read only the item, and the
eval's criteria can still run here (a judge deleted or python graders switched off since: `testing_criteria[i]...`).
Generation and grading run on a worker (`worker/evaluating.py`, its writes in `eval_lifecycle.py`), never here.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from app.core import ids
from app.core.broker import Broker
from app.core.config import Settings
from app.core.errors import APIError, bad_request, not_found
from app.db.base import unix, utcnow
from app.db.models import ApiKey, Eval, EvalOutputItem, EvalRun, EvalRunStatus, File
from app.schemas.evals import (
    CompletionsDataSource,
    EvalCreate,
    EvalList,
    EvalObject,
    EvalRunList,
    EvalRunObject,
    EvalUpdate,
    OutputItemList,
    OutputItemObject,
    RunCreate,
)
from app.services import eval_criteria, eval_items, files, models
from app.services.common import owned, page
from app.services.dispatch import send_eval
from app.services.eval_items import ItemsError

ACTIVE = (EvalRunStatus.QUEUED, EvalRunStatus.IN_PROGRESS)
ITEM_PURPOSES = ("evals", "fine-tune")
# The `sample` namespace a completions run fills in (what graders read as {{sample.<field>}})
SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"model": {"type": "string"}, "choices": {"type": "array"}, "output_text": {"type": "string"},
                   "output_json": {"type": "object"}, "output_tools": {"type": "array"}},
    "required": ["model", "choices", "output_text"],
}


# ---- evals ----


def create_eval(*, session: Session, settings: Settings, key: ApiKey, payload: EvalCreate) -> Eval:
    criteria = eval_criteria.check(session=session, settings=settings, key=key, criteria=payload.testing_criteria)
    eval_id = ids.new_id(ids.EVAL)
    row = Eval(id=eval_id, owner_id=key.id, name=payload.name or eval_id, meta=payload.metadata,
               data_source_config=payload.data_source_config.model_dump(mode="json"), testing_criteria=criteria)
    session.add(row)
    session.commit()
    return row


def get_eval(*, session: Session, key: ApiKey, eval_id: str) -> Eval:
    row = session.scalar(owned(select(Eval).where(Eval.id == eval_id), Eval.owner_id, key))
    if row is None:
        raise not_found("eval", eval_id, code="eval_not_found")
    return row


def list_evals(*, session: Session, key: ApiKey, after: str | None, limit: int, order: str) -> EvalList:
    rows, more = page(session, owned(select(Eval), Eval.owner_id, key), Eval.id, after=after, limit=limit,
                      descending=order == "desc")
    data = [eval_object(r) for r in rows]
    return EvalList(data=data, has_more=more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


def update_eval(*, session: Session, key: ApiKey, eval_id: str, payload: EvalUpdate) -> Eval:
    row = get_eval(session=session, key=key, eval_id=eval_id)
    if payload.name is not None:
        row.name = payload.name
    if "metadata" in payload.model_fields_set:
        row.meta = payload.metadata
    session.commit()
    return row


def delete_eval(*, session: Session, key: ApiKey, eval_id: str) -> None:
    """The eval, its runs and their output items (the database's cascade). Refused while a run is queued or in
    progress: cancel those first."""
    row = get_eval(session=session, key=key, eval_id=eval_id)
    active = session.scalar(select(EvalRun.id).where(EvalRun.eval_id == eval_id, EvalRun.status.in_(ACTIVE)).limit(1))
    if active is not None:
        raise bad_request(f"Eval {eval_id} has run {active} queued or in progress; cancel it first.",
                          code="eval_run_in_progress")
    session.delete(row)
    session.commit()


def eval_object(row: Eval) -> EvalObject:
    config = row.data_source_config
    properties: dict[str, Any] = {"item": config["item_schema"]}
    if config.get("include_sample_schema"):
        properties["sample"] = SAMPLE_SCHEMA
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return EvalObject(id=row.id, name=row.name, created_at=unix(row.created_at) or 0, metadata=row.meta,
                      data_source_config={"type": config["type"], "schema": schema},
                      testing_criteria=list(row.testing_criteria))


# ---- runs ----


def create_run(*, session: Session, settings: Settings, broker: Broker, key: ApiKey, eval_id: str,
               payload: RunCreate) -> EvalRun:
    """Check the run (see the module's docstring), queue it, and send its message once committed."""
    ev = get_eval(session=session, key=key, eval_id=eval_id)
    source = payload.data_source
    _check_model(session, settings, key, source.model)
    eval_criteria.recheck(session=session, settings=settings, key=key, stored=ev.testing_criteria)
    params = source.sampling_params
    if params is not None and params.max_completion_tokens is not None and \
            params.max_completion_tokens > settings.max_tokens:
        raise bad_request(f"max_completion_tokens must be at most {settings.max_tokens} on this server.",
                          param="data_source.sampling_params.max_completion_tokens")
    try:
        eval_items.check_input_messages(source.input_messages.model_dump(mode="json"))
        items = load_items(session=session, settings=settings, key=key, source=source)
        where = eval_items.SOURCE_ID if source.source.type == "file_id" else "data_source.source.content"
        eval_items.check_schema(items, ev.data_source_config["item_schema"], where)
    except ItemsError as e:
        raise bad_request(e.message, param=e.param, code=e.code) from None
    _check_caps(session, settings, key)
    seed = params.seed if params is not None and params.seed is not None else secrets.randbelow(2**31)
    criteria = ev.testing_criteria
    row = EvalRun(id=ids.new_id(ids.EVAL_RUN), eval_id=ev.id, owner_id=key.id, name=payload.name or source.model,
                  meta=payload.metadata, model=source.model, data_source=source.model_dump(mode="json",
                                                                                          exclude_unset=True),
                  testing_criteria=criteria, seed=seed, status=EvalRunStatus.QUEUED,
                  result_counts={"total": 0, "errored": 0, "failed": 0, "passed": 0},
                  per_testing_criteria_results=[{"testing_criteria": c["id"], "passed": 0, "failed": 0}
                                                for c in criteria],
                  per_model_usage=[])
    session.add(row)
    session.commit()
    send_eval(session=session, broker=broker, run_id=row.id, attempt=row.attempt)
    return row


def load_items(*, session: Session, settings: Settings, key: ApiKey,
               source: CompletionsDataSource | dict[str, Any]) -> list[dict[str, Any]]:
    """The data source's items (a file is read from disk). Raises ItemsError, or an APIError for a file the key
    cannot see."""
    spec = source.model_dump(mode="json") if isinstance(source, CompletionsDataSource) else source
    given = spec["source"]
    if given["type"] == "file_content":
        if len(given["content"]) > settings.max_eval_items:
            raise ItemsError(f"file_content holds {len(given['content'])} items; one run takes at most "
                             f"{settings.max_eval_items}.", "data_source.source.content")
        return eval_items.from_content(given["content"])
    row = session.scalar(owned(select(File).where(File.id == given["id"], File.deleted_at.is_(None)),
                               File.owner_id, key))
    if row is None:
        raise ItemsError(f"No file found with id '{given['id']}'.", eval_items.SOURCE_ID, "file_not_found")
    if row.purpose not in ITEM_PURPOSES:
        raise ItemsError(f"File {row.id} has purpose '{row.purpose}'; upload the items with purpose 'evals'.",
                         eval_items.SOURCE_ID, "invalid_file_purpose")
    try:
        path = files.readable_content(settings, row, param=eval_items.SOURCE_ID)
    except APIError as e:
        raise ItemsError(e.message, eval_items.SOURCE_ID, e.code or "file_content_missing") from None
    return eval_items.from_file(path, row.id, settings.max_eval_items)


def _check_model(session: Session, settings: Settings, key: ApiKey, model_id: str) -> None:
    """A model this server serves that the key may use, else a 400 at `data_source.model`."""
    try:
        models.resolve_servable(session=session, settings=settings, key=key, model_id=model_id)
    except APIError as e:
        raise APIError(400, f"{e.message} A run's model is one this server serves (GET /v1/models).",
                       param="data_source.model", code=e.code) from None


def _check_caps(session: Session, settings: Settings, key: ApiKey) -> None:
    active = session.scalar(select(func.count()).select_from(EvalRun).where(EvalRun.owner_id == key.id,
                                                                           EvalRun.status.in_(ACTIVE))) or 0
    if active >= settings.max_active_eval_runs_per_key:
        raise APIError(429, f"This API key has {active} eval runs queued or in progress, its limit; wait for some "
                            "to finish or cancel some.", type="rate_limit_error", code="too_many_active_eval_runs",
                       headers={"Retry-After": "60"})


def get_run(*, session: Session, key: ApiKey, eval_id: str, run_id: str) -> EvalRun:
    row = session.scalar(owned(select(EvalRun).where(EvalRun.id == run_id, EvalRun.eval_id == eval_id),
                               EvalRun.owner_id, key))
    if row is None:
        raise not_found("eval run", run_id, code="eval_run_not_found")
    return row


def list_runs(*, session: Session, key: ApiKey, eval_id: str, after: str | None, limit: int, order: str,
              status: str | None) -> EvalRunList:
    get_eval(session=session, key=key, eval_id=eval_id)
    query = owned(select(EvalRun).where(EvalRun.eval_id == eval_id), EvalRun.owner_id, key)
    if status:
        query = query.where(EvalRun.status == status)
    rows, more = page(session, query, EvalRun.id, after=after, limit=limit, descending=order == "desc")
    data = [run_object(r) for r in rows]
    return EvalRunList(data=data, has_more=more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)


def cancel_run(*, session: Session, key: ApiKey, eval_id: str, run_id: str) -> EvalRun:
    """A queued run is canceled at once; an in-progress one between two batches (its graded items stay). A
    compare-and-set each time: a worker's claim between the read and the write makes the write miss, and the run is
    read again."""
    for _ in range(3):
        row = get_run(session=session, key=key, eval_id=eval_id, run_id=run_id)
        if row.status == EvalRunStatus.CANCELED or (row.status == EvalRunStatus.IN_PROGRESS and row.cancel_requested):
            return row
        if row.status not in ACTIVE:
            raise bad_request(f"Eval run {run_id} is {row.status}; it cannot be canceled.",
                              code="eval_run_not_cancelable")
        values: dict[str, Any] = {"cancel_requested": True}
        if row.status == EvalRunStatus.QUEUED:
            values.update(status=EvalRunStatus.CANCELED, finished_at=utcnow())
        result = session.execute(update(EvalRun).where(EvalRun.id == row.id, EvalRun.status == row.status,
                                                       EvalRun.attempt == row.attempt).values(**values))
        if result.rowcount == 1:  # type: ignore[attr-defined]
            session.commit()
            session.refresh(row)
            return row
        session.rollback()
    raise APIError(409, f"Eval run {run_id} is changing state; try again.", code="eval_run_busy",
                   headers={"x-should-retry": "true"})


def delete_run(*, session: Session, key: ApiKey, eval_id: str, run_id: str) -> None:
    """The run and its output items. Refused while it is queued or in progress: cancel it first."""
    row = get_run(session=session, key=key, eval_id=eval_id, run_id=run_id)
    if row.status in ACTIVE:
        raise bad_request(f"Eval run {run_id} is {row.status}; cancel it first.", code="eval_run_in_progress")
    session.delete(row)
    session.commit()


def run_object(row: EvalRun) -> EvalRunObject:
    return EvalRunObject.model_validate({
        "id": row.id, "eval_id": row.eval_id, "name": row.name, "model": row.model, "status": row.status,
        "created_at": unix(row.created_at) or 0, "data_source": row.data_source, "metadata": row.meta,
        "result_counts": row.result_counts, "per_testing_criteria_results": row.per_testing_criteria_results,
        "per_model_usage": row.per_model_usage, "error": row.error, "cancel_requested": row.cancel_requested,
        "started_at": unix(row.started_at), "finished_at": unix(row.finished_at)})


# ---- output items ----


def _items_query(session: Session, key: ApiKey, eval_id: str, run_id: str) -> Select[Any]:
    get_run(session=session, key=key, eval_id=eval_id, run_id=run_id)
    return select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)


def list_output_items(*, session: Session, key: ApiKey, eval_id: str, run_id: str, after: str | None, limit: int,
                      order: str, status: str | None) -> OutputItemList:
    query = _items_query(session, key, eval_id, run_id)
    if status:
        query = query.where(EvalOutputItem.status == status)
    rows, more = page(session, query, EvalOutputItem.id, after=after, limit=limit, descending=order == "desc")
    data = [output_item_object(r) for r in rows]
    return OutputItemList(data=data, has_more=more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


def get_output_item(*, session: Session, key: ApiKey, eval_id: str, run_id: str,
                    output_item_id: str) -> EvalOutputItem:
    row = session.scalar(_items_query(session, key, eval_id, run_id).where(EvalOutputItem.id == output_item_id))
    if row is None:
        raise not_found("output item", output_item_id, code="output_item_not_found")
    return row


def output_item_object(row: EvalOutputItem) -> OutputItemObject:
    return OutputItemObject(id=row.id, run_id=row.run_id, eval_id=row.eval_id, created_at=unix(row.created_at) or 0,
                            status=row.status,  # type: ignore[arg-type]
                            datasource_item_id=row.datasource_item_id, datasource_item=row.datasource_item,
                            results=list(row.results), sample=row.sample)
