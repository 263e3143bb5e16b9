"""Exports of a model (a fine-tune, a checkpoint or a base model) to GGUF, a merged Hugging Face directory or a PEFT
adapter: create (checked, idempotent, capped per key), list, retrieve, cancel, delete. Merging, quantizing and the
read-back check run on a worker (`worker/exporting.py`); its side of the lifecycle is `export_lifecycle.py`.

What the API checks before anything is queued: the model is one the key may use (another key's is 404, as for every
object), its files are there, the format fits it (a base model has no adapter to export as peft), and, for an Ollama
Modelfile, that its chat template is one we translate faithfully (the tokenizer is read here; no torch).
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import ids
from app.core.broker import Broker
from app.core.config import Settings
from app.core.errors import APIError, bad_request, not_found
from app.db.base import unix, utcnow
from app.db.models import ApiKey, Export, ExportStatus, File
from app.schemas.exports import DEFAULT_QUANTIZATION, ExportCreate, ExportError, ExportList, ExportObject
from app.services import models, storage
from app.services.common import by_idempotency_key, owned, page
from app.services.dispatch import send_export

ACTIVE = (ExportStatus.QUEUED, ExportStatus.RUNNING)


def request_hash(payload: ExportCreate) -> str:
    canonical = json.dumps(payload.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---- create ----


def create_export(*, session: Session, settings: Settings, broker: Broker, key: ApiKey, payload: ExportCreate,
                  idempotency_key: str | None, retry_count: int | None) -> Export:
    """Queue an export, or return the one an earlier identical request made (the same rules as a job's create: an
    `Idempotency-Key`; without one, a retry of the same body within `idempotency_window_s`, where a client that
    sends no `x-stainless-retry-count` counts as retrying). A failed or cancelled export is never what a retry gets
    back: asking again makes a new one."""
    digest = request_hash(payload)
    if idempotency_key is not None:
        existing = by_idempotency_key(session, Export, key, idempotency_key, digest)
        if existing is not None:
            return existing
    elif retry_count != 0 and settings.idempotency_window_s > 0:
        since = utcnow() - timedelta(seconds=settings.idempotency_window_s)
        existing = session.scalar(select(Export).where(
            Export.owner_id == key.id, Export.request_hash == digest, Export.idempotency_key.is_(None),
            Export.deleted_at.is_(None), Export.status.not_in((ExportStatus.FAILED, ExportStatus.CANCELLED)),
            Export.created_at >= since).order_by(Export.id.desc()).limit(1))
        if existing is not None:
            return existing
    check_source(session=session, settings=settings, key=key, payload=payload)
    _check_caps(session, settings, key)
    row = Export(id=ids.new_id(ids.EXPORT), owner_id=key.id, model=payload.model, format=payload.format,
                 quantization=payload.quantization or DEFAULT_QUANTIZATION.get(payload.format),
                 ollama=payload.ollama, status=ExportStatus.QUEUED, idempotency_key=idempotency_key,
                 request_hash=digest, result_files=[])
    session.add(row)
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the insert
        session.rollback()
        existing = by_idempotency_key(session, Export, key, idempotency_key, digest) if idempotency_key else None
        if existing is None:
            raise
        return existing
    send_export(session=session, broker=broker, export_id=row.id, attempt=row.attempt)
    return row


def check_source(*, session: Session, settings: Settings, key: ApiKey, payload: ExportCreate) -> None:
    """The model can be exported as asked: 404 when the key cannot see it or its files are gone, 400 when the
    format or the Modelfile cannot apply to it."""
    source = models.resolve_servable(session=session, settings=settings, key=key, model_id=payload.model)
    if payload.format == "peft" and source.adapter_path is None:
        raise bad_request(f"The model '{payload.model}' is a base model: it has no adapter to export as peft; use "
                          "format 'merged' or 'gguf'.", param="format", code="model_has_no_adapter")
    if payload.ollama:
        tokenizer_dir = source.base_path
        if source.adapter_path is not None and (source.adapter_path / "tokenizer.json").is_file():
            tokenizer_dir = source.adapter_path  # the tokenizer and chat template the adapter was trained with
        _check_modelfile(payload.model, tokenizer_dir)


def _check_modelfile(model: str, tokenizer_dir: Path) -> None:
    """Refused now rather than after the merge: a chat template whose Ollama TEMPLATE we cannot write exactly."""
    from unsloth_core.errors import UnslothError
    from unsloth_core.ollama import detect
    from unsloth_core.tokenizer import Tokenizer

    try:
        detect(Tokenizer.from_dir(tokenizer_dir))
    except (UnslothError, ValueError) as e:
        raise bad_request(f"No Ollama Modelfile can be written for '{model}': {e}", param="ollama",
                          code="chat_template_not_translatable") from None


def _check_caps(session: Session, settings: Settings, key: ApiKey) -> None:
    """Per key (an admin's own exports too): how many may be queued or running, and how many kept."""
    kept = select(func.count()).select_from(Export).where(Export.owner_id == key.id, Export.deleted_at.is_(None))
    active = session.scalar(kept.where(Export.status.in_(ACTIVE))) or 0
    if active >= settings.max_active_exports_per_key:
        raise APIError(429, f"This API key has {active} exports queued or running, its limit; wait for some to "
                            "finish or cancel some.", type="rate_limit_error", code="too_many_active_exports",
                       headers={"Retry-After": "60"})
    total = session.scalar(kept) or 0
    if total >= settings.max_exports_per_key:  # waiting does not cure it: deleting does
        raise APIError(429, f"This API key keeps {total} exports, its limit; delete some first "
                            "(DELETE /v1/exports/{id}).", type="insufficient_quota", code="insufficient_quota",
                       headers={"x-should-retry": "false"})


# ---- reading ----


def get_export(*, session: Session, key: ApiKey, export_id: str) -> Export:
    row = session.scalar(owned(select(Export).where(Export.id == export_id, Export.deleted_at.is_(None)),
                               Export.owner_id, key))
    if row is None:
        raise not_found("export", export_id, code="export_not_found")
    return row


def list_exports(*, session: Session, key: ApiKey, after: str | None, limit: int, model: str | None) -> ExportList:
    query = owned(select(Export).where(Export.deleted_at.is_(None)), Export.owner_id, key)
    if model:
        query = query.where(Export.model == model)
    rows, more = page(session, query, Export.id, after=after, limit=limit)
    data = [export_object(r) for r in rows]
    return ExportList(data=data, has_more=more, first_id=data[0].id if data else None,
                      last_id=data[-1].id if data else None)


# ---- cancel and delete ----


def cancel_export(*, session: Session, key: ApiKey, export_id: str) -> Export:
    """A queued export is cancelled at once; a running one when its worker's engine next checks (between tensors
    while merging, writing and reading back, and between probe prompts while verifying; the flag is read at most
    once a second): what it wrote is then deleted, never recorded. A compare-and-set each time: a worker's
    claim between the read and the write makes the write miss, and the export is read again."""
    for _ in range(3):
        row = get_export(session=session, key=key, export_id=export_id)
        if row.status == ExportStatus.CANCELLED or (row.status == ExportStatus.RUNNING and row.cancel_requested):
            return row
        if row.status not in ACTIVE:
            raise bad_request(f"Export {export_id} has already {row.status}; it cannot be cancelled.",
                              code="export_not_cancellable")
        if row.status == ExportStatus.QUEUED:
            values = {"status": ExportStatus.CANCELLED, "finished_at": utcnow()}
        else:
            values = {"cancel_requested": True}
        result = session.execute(update(Export).where(Export.id == row.id, Export.status == row.status,
                                                      Export.attempt == row.attempt).values(**values))
        if result.rowcount == 1:  # type: ignore[attr-defined]
            session.commit()
            session.refresh(row)
            return row
        session.rollback()
    raise APIError(409, f"Export {export_id} is changing state; try again.", code="export_busy",
                   headers={"x-should-retry": "true"})


def delete_export(*, session: Session, settings: Settings, key: ApiKey, export_id: str) -> None:
    """The export and its files: the rows first (nothing is served once they are gone), then the bytes."""
    row = get_export(session=session, key=key, export_id=export_id)
    if row.status in ACTIVE:
        raise bad_request(f"Export {export_id} is {row.status}; cancel it first.", code="export_in_progress")
    now = utcnow()
    row.deleted_at = now
    if row.result_files:
        session.execute(update(File).where(File.id.in_(row.result_files), File.deleted_at.is_(None))
                        .values(deleted_at=now))
    session.commit()
    storage.remove_export_dir(settings, row.id)


# ---- objects ----


def export_object(row: Export) -> ExportObject:
    return ExportObject(
        id=row.id, created_at=unix(row.created_at) or 0, model=row.model, format=row.format,  # type: ignore[arg-type]
        quantization=row.quantization, ollama=row.ollama, status=row.status,  # type: ignore[arg-type]
        error=ExportError(**row.error) if row.error else None, result_files=list(row.result_files or []),
        verification=row.verification, cancel_requested=row.cancel_requested, started_at=unix(row.started_at),
        finished_at=unix(row.finished_at))
