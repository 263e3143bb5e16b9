"""Sending train (and export, and eval run) messages: always after the row is committed, and again for queued jobs
(and exports, and eval runs) whose message was lost.

The message is only a wake-up call carrying `(job_id, attempt)`; the worker's conditional claim makes duplicates
harmless, so re-sending is safe. Re-sends back off exponentially (`resend_after_s`, doubling, capped at
`resend_max_interval_s`) so a job waiting hours behind a long one does not flood the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.broker import Broker
from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import EvalRun, EvalRunStatus, Export, ExportStatus, Job, JobStatus

log = logging.getLogger("app.dispatch")


# Each kind of queued work (jobs, exports, eval runs) has id, attempt, status, send_count and resend_at.
Queued = type[Job] | type[Export] | type[EvalRun]
QUEUED_STATUS = {Job: JobStatus.QUEUED, Export: ExportStatus.QUEUED, EvalRun: EvalRunStatus.QUEUED}


def send_train(*, session: Session, broker: Broker, job_id: str, attempt: int) -> bool:
    """Send `train(job_id, attempt)`; record when. False (logged) when the broker is unreachable: the re-send loop
    will try again, the job stays queued."""
    return _send(session, broker, Job, job_id, attempt, broker.send_train, "job")


def resend_wait(settings: Settings, sends: int) -> timedelta:
    """How long after its `sends`-th message a job is sent again: `resend_after_s`, doubling, capped."""
    return timedelta(seconds=min(settings.resend_after_s * 2 ** max(sends - 1, 0), settings.resend_max_interval_s))


def resend_unclaimed(*, session: Session, broker: Broker, now: datetime | None = None, limit: int = 100) -> list[str]:
    """Re-send the message of every queued job not claimed in time (the worker's beat calls this periodically),
    the longest overdue first, at most `limit`. Returns the ids sent."""
    return _resend(session, Job, now, limit, lambda i, a: send_train(session=session, broker=broker, job_id=i,
                                                                      attempt=a), "job")


# ---- exports: the same wake-up calls, `export_model(export_id, attempt)` on the gpu queue ----


def send_export(*, session: Session, broker: Broker, export_id: str, attempt: int) -> bool:
    """Send `export_model(export_id, attempt)`; record when. False (logged) when the broker is unreachable: the
    re-send loop tries again, the export stays queued."""
    return _send(session, broker, Export, export_id, attempt, broker.send_export, "export")


def resend_unclaimed_exports(*, session: Session, broker: Broker, now: datetime | None = None,
                             limit: int = 100) -> list[str]:
    """Re-send the message of every queued export not claimed in time, the longest overdue first."""
    return _resend(session, Export, now, limit, lambda i, a: send_export(session=session, broker=broker,
                                                                         export_id=i, attempt=a), "export")


# ---- eval runs: the same wake-up calls, `run_eval(run_id, attempt)` on the gpu queue ----


def send_eval(*, session: Session, broker: Broker, run_id: str, attempt: int) -> bool:
    """Send `run_eval(run_id, attempt)`; record when. False (logged) when the broker is unreachable: the re-send
    loop tries again, the run stays queued."""
    return _send(session, broker, EvalRun, run_id, attempt, broker.send_eval, "eval run")


def resend_unclaimed_evals(*, session: Session, broker: Broker, now: datetime | None = None,
                           limit: int = 100) -> list[str]:
    """Re-send the message of every queued eval run not claimed in time, the longest overdue first."""
    return _resend(session, EvalRun, now, limit, lambda i, a: send_eval(session=session, broker=broker, run_id=i,
                                                                        attempt=a), "eval run")


# ---- shared ----


def _send(session: Session, broker: Broker, table: Queued, row_id: str, attempt: int,
          send: Callable[[str, int], None], what: str) -> bool:
    """The message sent, then the row's send count and next re-send time, if it is still queued as `attempt`."""
    try:
        send(row_id, attempt)
    except Exception as e:
        log.warning("could not send %s %s (attempt %d) to the broker: %s", what, row_id, attempt, e)
        return False
    now = utcnow()
    sends = session.scalar(select(table.send_count).where(table.id == row_id)) or 0
    values: dict[str, Any] = {"send_count": table.send_count + 1,
                              "resend_at": now + resend_wait(broker.settings, sends + 1)}
    if table is Job:
        values["enqueued_at"] = now
    session.execute(update(table).where(table.id == row_id, table.attempt == attempt,
                                        table.status == QUEUED_STATUS[table]).values(**values))
    session.commit()
    return True


def _resend(session: Session, table: Queued, now: datetime | None, limit: int,
            send: Callable[[str, int], bool], what: str) -> list[str]:
    now = now or utcnow()
    query = (select(table.id, table.attempt).where(table.status == QUEUED_STATUS[table],
                                                   or_(table.resend_at.is_(None), table.resend_at <= now))
             .order_by(table.resend_at.is_not(None), table.resend_at, table.id).limit(limit))
    sent = [row_id for row_id, attempt in list(session.execute(query)) if send(row_id, attempt)]
    if sent:
        log.info("re-sent %d unclaimed %s(s): %s", len(sent), what, ", ".join(sent))
    return sent
