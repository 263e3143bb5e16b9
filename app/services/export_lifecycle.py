"""The worker's side of an export, as fenced writes: claim, lease renewal, the end (succeeded with its files, failed,
cancelled), and the reaper that recovers exports whose worker died.

As for jobs (`lifecycle.py`), every write a worker makes matches on export id + attempt + lease owner + status
`running`, so a duplicate or stale delivery, or a worker whose lease was taken over, changes nothing. The artifacts
become `File` rows in the same transaction that marks the export succeeded: a file is served only once its export
has succeeded, and an export that did not succeed has no file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.core import ids
from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import Export, ExportStatus, File
from app.schemas.files import EXPORT_PURPOSE
from app.services import storage
from app.services.lifecycle import DEFAULT_LEASE, LeaseLost, db_now

log = logging.getLogger("app.export_lifecycle")


@dataclass(frozen=True)
class Artifact:
    """A file an export wrote, ready to be recorded: where it is, the name it is downloaded as, its size and hash."""

    path: Path
    filename: str
    bytes: int
    sha256: str


def claimable(*, session: Session, export_id: str, attempt: int) -> bool:
    """Whether an `export_model(export_id, attempt)` message could still claim the export (once False, always)."""
    row = session.execute(select(Export.status, Export.attempt).where(Export.id == export_id)).one_or_none()
    session.rollback()
    return row is not None and (row.status, row.attempt) == (ExportStatus.QUEUED, attempt)


def claim_export(*, session: Session, export_id: str, attempt: int, owner: str,
                 lease: timedelta = DEFAULT_LEASE) -> Export | None:
    """queued + matching attempt -> running, leased to `owner`. None: a duplicate or stale message (drop it)."""
    now = db_now(session)
    result = session.execute(update(Export).where(Export.id == export_id, Export.status == ExportStatus.QUEUED,
                                                  Export.attempt == attempt)
                             .values(status=ExportStatus.RUNNING, lease_owner=owner, lease_expires_at=now + lease,
                                     started_at=func.coalesce(Export.started_at, now)))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return None
    session.commit()
    return session.get(Export, export_id, populate_existing=True)


def _fenced(session: Session, export_id: str, attempt: int, owner: str, values: dict[str, Any]) -> bool:
    """The first write of a fenced transaction: False (rolled back) when this worker no longer holds the export."""
    result = session.execute(update(Export).where(Export.id == export_id, Export.status == ExportStatus.RUNNING,
                                                  Export.attempt == attempt, Export.lease_owner == owner)
                             .values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    return True


def renew_lease(*, session: Session, export_id: str, attempt: int, owner: str,
                lease: timedelta = DEFAULT_LEASE) -> bool:
    """Extend the lease; returns whether a cancel was asked for. Raises LeaseLost."""
    if not _fenced(session, export_id, attempt, owner, {"lease_expires_at": db_now(session) + lease}):
        raise LeaseLost(export_id)
    cancel = bool(session.scalar(select(Export.cancel_requested).where(Export.id == export_id)))
    session.commit()
    return cancel


def cancel_requested(*, session: Session, export_id: str) -> bool:
    """Whether the user asked to cancel the export (one indexed read; the worker's engine polls it)."""
    cancel = bool(session.scalar(select(Export.cancel_requested).where(Export.id == export_id)))
    session.rollback()  # end the read's transaction: a poller must not hold a snapshot open
    return cancel


def _hold(session: Session, export_id: str, attempt: int, owner: str) -> Export | None:
    """The export, held for this transaction while this worker owns it (a fenced write first, as lifecycle._hold
    explains: SQLite has no row lock to read under)."""
    if not _fenced(session, export_id, attempt, owner, {"lease_owner": owner}):
        return None
    return session.scalar(select(Export).where(Export.id == export_id).execution_options(populate_existing=True))


def _ended(status: ExportStatus, **values: Any) -> dict[str, Any]:
    return {"status": status, "lease_owner": None, "lease_expires_at": None, "finished_at": utcnow(), **values}


def complete_export(*, session: Session, settings: Settings, export_id: str, attempt: int, owner: str,
                    artifacts: list[Artifact], verification: dict[str, Any]) -> ExportStatus | None:
    """The artifacts as files (purpose `export`, owned by the export's key) and the export succeeded, in one
    transaction; `cancelled` instead (nothing recorded) when a cancel arrived meanwhile. Returns the status written,
    None when the fence fails. The caller deletes the files unless it is `succeeded`."""
    row = _hold(session, export_id, attempt, owner)
    if row is None:
        return None
    if row.cancel_requested:
        session.execute(update(Export).where(Export.id == export_id)
                        .values(**_ended(ExportStatus.CANCELLED, verification=verification)))
        session.commit()
        return ExportStatus.CANCELLED
    files = [File(id=ids.new_id(ids.FILE), owner_id=row.owner_id, filename=a.filename, purpose=EXPORT_PURPOSE,
                  bytes=a.bytes, status="processed", path=storage.export_relative(settings, a.path), sha256=a.sha256)
             for a in artifacts]
    session.add_all(files)
    session.execute(update(Export).where(Export.id == export_id).values(**_ended(
        ExportStatus.SUCCEEDED, result_files=[f.id for f in files], verification=verification)))
    session.commit()
    return ExportStatus.SUCCEEDED


def fail_export(*, session: Session, export_id: str, attempt: int, owner: str, code: str, message: str,
                param: str | None = None, verification: dict[str, Any] | None = None) -> ExportStatus | None:
    """`failed` with the error (and the check's figures, when the check is what failed); `cancelled` when the user
    had asked for that meanwhile. Returns the status written, None when the fence fails."""
    row = _hold(session, export_id, attempt, owner)
    if row is None:
        return None
    if row.cancel_requested:
        status, values = ExportStatus.CANCELLED, {}
    else:
        status, values = ExportStatus.FAILED, {"error": {"code": code, "message": message, "param": param}}
    session.execute(update(Export).where(Export.id == export_id)
                    .values(**_ended(status, verification=verification, **values)))
    session.commit()
    return status


def reap_expired(*, session: Session, settings: Settings, now: datetime | None = None,
                 limit: int = 20) -> tuple[list[tuple[str, int]], list[str]]:
    """Recover running exports whose lease expired (their worker died): requeued as attempt + 1 while under
    `max_job_restarts` (the next attempt starts by deleting the dead one's files), else failed; a pending cancel is
    honoured. Returns ((export id, attempt) requeued, to send once committed; ids that ended, whose files the caller
    deletes)."""
    now = now or db_now(session)
    rows = session.execute(select(Export.id, Export.attempt, Export.restarts, Export.cancel_requested)
                           .where(Export.status == ExportStatus.RUNNING, Export.lease_expires_at < now)
                           .order_by(Export.lease_expires_at).limit(limit).with_for_update(skip_locked=True)).all()
    requeued, ended = [], []
    for row in rows:
        lost = f"The worker running attempt {row.attempt} stopped responding (its lease expired)"
        values: dict[str, Any] = {"attempt": row.attempt + 1, "lease_owner": None, "lease_expires_at": None,
                                  "send_count": 0, "resend_at": None, "restarts": row.restarts + 1}
        if row.cancel_requested:
            values.update(status=ExportStatus.CANCELLED, finished_at=now)
        elif row.restarts >= settings.max_job_restarts:
            values.update(status=ExportStatus.FAILED, finished_at=now, error={
                "code": "worker_lost", "param": None, "message": f"{lost}; it stopped {row.restarts + 1} times "
                "(crashed, was killed, or ran out of host memory), so it was not retried again."})
        else:
            values.update(status=ExportStatus.QUEUED)
        result = session.execute(update(Export).where(Export.id == row.id, Export.status == ExportStatus.RUNNING,
                                                      Export.attempt == row.attempt).values(**values))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        if values["status"] == ExportStatus.QUEUED:
            requeued.append((row.id, row.attempt + 1))
        else:
            ended.append(row.id)
        log.warning("export %s: lease expired (attempt %d): %s", row.id, row.attempt, values["status"])
    session.commit()
    return requeued, ended
