"""Models: base models found in `<data dir>/models` (public), fine-tunes and checkpoints (owned), with lineage.

Ids: a base model is its directory name (`smollm2-135m-instruct`, or `org/name` one level down); a fine-tune is
`ft:<base>:<suffix>:<job id>`; a checkpoint `<fine-tune id>:ckpt-step-<N>`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import APIError
from app.db.base import unix, utcnow
from app.db.models import ApiKey, Model
from app.schemas.models import ModelList, ModelObject
from app.services import storage
from app.services.storage import BASE_ID, base_model_dir

log = logging.getLogger("app.models")


def fine_tuned_model_id(base: str, suffix: str | None, job_id: str) -> str:
    return f"ft:{base}:{suffix or ''}:{job_id}"


def checkpoint_model_id(fine_tuned_model: str, step: int) -> str:
    return f"{fine_tuned_model}:ckpt-step-{step}"


def root_of(session: Session, model_id: str) -> str:
    """The base model under a model id: itself for a base, its row's `root` for a fine-tune or a checkpoint (a job
    that continues a fine-tune trains on that base, and its own fine-tune is named after it)."""
    row = session.get(Model, model_id)
    return row.root if row is not None and row.kind != "base" else model_id


@dataclass(frozen=True)
class Servable:
    """What inference needs to serve a model id: the base directory, and the adapter applied on top (if any)."""

    id: str
    kind: str
    base_id: str
    base_path: Path
    adapter_path: Path | None


# ---- base models on disk ----


def scan_base_models(models_dir: Path) -> dict[str, Path]:
    """Hugging Face directories (with config.json) directly in the models dir, or one level down (`org/name`)."""
    found: dict[str, Path] = {}
    if not models_dir.is_dir():
        return found
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        if (child / "config.json").is_file():
            candidates = [(child.name, child)]
        else:
            candidates = [(f"{child.name}/{g.name}", g) for g in sorted(child.iterdir())
                          if g.is_dir() and not g.name.startswith(".") and (g / "config.json").is_file()]
        for model_id, path in candidates:
            if BASE_ID.fullmatch(model_id):
                found[model_id] = path
            else:
                log.warning("skipping %s: %r is not a usable model id", path, model_id)
    return found


def sync_base_models(*, session: Session, settings: Settings) -> None:
    """Make the base rows match the models dir: new directories appear, removed ones disappear."""
    on_disk = scan_base_models(settings.models_dir)
    rows = {r.id: r for r in session.scalars(select(Model).where(Model.kind == "base"))}
    changed = False
    for model_id, path in on_disk.items():
        relative = storage.base_model_relative(settings, path)
        row = rows.get(model_id)
        if row is None:
            add_base_row(session, model_id, relative)
            changed = True
        elif row.deleted_at is not None or row.path != relative:
            row.deleted_at, row.path, changed = None, relative, True
    for model_id, row in rows.items():
        if model_id not in on_disk and row.deleted_at is None:
            row.deleted_at, changed = utcnow(), True
    if changed:
        session.commit()


def add_base_row(session: Session, model_id: str, relative: str) -> None:
    """Insert a base model's row unless one exists: two requests that both find a new directory (two concurrent
    `GET /v1/models`) both insert it, and a plain INSERT made the second one a 500."""
    values = {"id": model_id, "kind": "base", "owner_id": None, "parent": None, "root": model_id, "path": relative,
              "created_at": utcnow()}
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(Model).values(**values).on_conflict_do_nothing(index_elements=["id"]))


def context_length(path: Path) -> int | None:
    try:
        config = json.loads((path / "config.json").read_text())
        return int(config["max_position_embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- lookups ----


def get_model(*, session: Session, settings: Settings, key: ApiKey, model_id: str,
              param: str | None = None) -> Model:
    query = select(Model).where(Model.id == model_id, Model.deleted_at.is_(None))
    if not key.is_admin:
        query = query.where(or_(Model.owner_id.is_(None), Model.owner_id == key.id))
    row = session.scalar(query)
    if row is None and base_model_dir(settings, model_id) is not None:
        sync_base_models(session=session, settings=settings)  # a directory added since the last scan
        row = session.scalar(query)
    if row is None:
        raise APIError(404, f"The model '{model_id}' does not exist or you do not have access to it.", param=param,
                       code="model_not_found")
    return row


def list_models(*, session: Session, settings: Settings, key: ApiKey) -> ModelList:
    sync_base_models(session=session, settings=settings)
    query = select(Model).where(Model.deleted_at.is_(None))
    if not key.is_admin:
        query = query.where(or_(Model.owner_id.is_(None), Model.owner_id == key.id))
    rows = session.scalars(query.order_by(Model.created_at, Model.id))
    return ModelList(data=[model_object(settings, r) for r in rows])


def delete_model(*, session: Session, settings: Settings, key: ApiKey, model_id: str) -> list[str]:
    """Delete a fine-tune (with its checkpoints) or one checkpoint; returns the ids removed (to evict from the
    inference cache). Base models are managed on disk, not over the API."""
    row = get_model(session=session, settings=settings, key=key, model_id=model_id)
    if row.kind == "base":
        raise APIError(403, f"The base model '{model_id}' cannot be deleted over the API.", type="permission_error",
                       code="model_not_deletable")
    rows = [row]
    if row.kind == "fine_tune":
        rows += list(session.scalars(select(Model).where(Model.parent == row.id, Model.deleted_at.is_(None))))
    now = utcnow()
    session.execute(update(Model).where(Model.id.in_([r.id for r in rows])).values(deleted_at=now))
    session.commit()
    for r in rows:
        storage.remove_artifact(settings, r.path)
    return [r.id for r in rows]


def resolve_servable(*, session: Session, settings: Settings, key: ApiKey, model_id: str) -> Servable:
    row = get_model(session=session, settings=settings, key=key, model_id=model_id, param="model")
    base_path = base_model_dir(settings, row.root)
    if base_path is None:
        raise APIError(404, f"The base model '{row.root}' of '{model_id}' is no longer installed.", param="model",
                       code="model_not_found")
    adapter = None
    if row.kind != "base":
        adapter = storage.adapter_dir(settings, row.path)
        if adapter is None:
            raise APIError(404, f"The files of model '{model_id}' are missing.", param="model",
                           code="model_not_found")
    return Servable(id=row.id, kind=row.kind, base_id=row.root, base_path=base_path, adapter_path=adapter)


def model_object(settings: Settings, row: Model) -> ModelObject:
    base = base_model_dir(settings, row.root)
    return ModelObject(id=row.id, created=unix(row.created_at) or 0,
                       owned_by="system" if row.owner_id is None else row.owner_id, parent=row.parent, root=row.root,
                       kind=row.kind,  # type: ignore[arg-type]
                       fine_tuning_job_id=row.job_id, max_model_len=context_length(base) if base else None)

