"""Sending train (and export, and eval run) messages: always after the row is committed, and again for queued jobs
(and exports, and eval runs) whose message was lost.

The message is only a wake-up call carrying `(job_id, attempt)`; the worker's conditional claim makes duplicates
harmless, so re-sending is safe. Re-sends back off exponentially (`resend_after_s`, doubling, capped at
`resend_max_interval_s`) so a job waiting hours behind a long one does not flood the queue.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.broker import Broker
from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import EvalRun, EvalRunStatus, Export, ExportStatus, Job, JobStatus

log = logging.getLogger("app.dispatch")


def send_train(*, session: Session, broker: Broker, job_id: str, attempt: int) -> bool:
    """Send `train(job_id, attempt)`; record when. False (logged) when the broker is unreachable: the re-send loop
    will try again, the job stays queued."""
    try:
        broker.send_train(job_id, attempt)
    except Exception as e:
        log.warning("could not send job %s (attempt %d) to the broker: %s", job_id, attempt, e)
        return False
    now = utcnow()
    sends = session.scalar(select(Job.send_count).where(Job.id == job_id)) or 0
    session.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == JobStatus.QUEUED)
                    .values(enqueued_at=now, send_count=Job.send_count + 1,
                            resend_at=now + resend_wait(broker.settings, sends + 1)))
    session.commit()
    return True


def resend_wait(settings: Settings, sends: int) -> timedelta:
    """How long after its `sends`-th message a job is sent again: `resend_after_s`, doubling, capped."""
    return timedelta(seconds=min(settings.resend_after_s * 2 ** max(sends - 1, 0), settings.resend_max_interval_s))


def resend_unclaimed(*, session: Session, broker: Broker, now: datetime | None = None, limit: int = 100) -> list[str]:
    """Re-send the message of every queued job not claimed in time (the worker's beat calls this periodically),
    the longest overdue first, at most `limit`. Returns the ids sent."""
    now = now or utcnow()
    query = (select(Job.id, Job.attempt).where(Job.status == JobStatus.QUEUED,
                                               or_(Job.resend_at.is_(None), Job.resend_at <= now))
             .order_by(Job.resend_at.is_not(None), Job.resend_at, Job.id).limit(limit))
    sent = []
    for job_id, attempt in list(session.execute(query)):
        if send_train(session=session, broker=broker, job_id=job_id, attempt=attempt):
            sent.append(job_id)
    if sent:
        log.info("re-sent %d unclaimed job(s): %s", len(sent), ", ".join(sent))
    return sent


# ---- exports: the same wake-up calls, `export_model(export_id, attempt)` on the gpu queue ----


def send_export(*, session: Session, broker: Broker, export_id: str, attempt: int) -> bool:
    """Send `export_model(export_id, attempt)`; record when. False (logged) when the broker is unreachable: the
    re-send loop tries again, the export stays queued."""
    try:
        broker.send_export(export_id, attempt)
    except Exception as e:
        log.warning("could not send export %s (attempt %d) to the broker: %s", export_id, attempt, e)
        return False
    sends = session.scalar(select(Export.send_count).where(Export.id == export_id)) or 0
    session.execute(update(Export).where(Export.id == export_id, Export.attempt == attempt,
                                         Export.status == ExportStatus.QUEUED)
                    .values(send_count=Export.send_count + 1,
                            resend_at=utcnow() + resend_wait(broker.settings, sends + 1)))
    session.commit()
    return True


def resend_unclaimed_exports(*, session: Session, broker: Broker, now: datetime | None = None,
                             limit: int = 100) -> list[str]:
    """Re-send the message of every queued export not claimed in time, the longest overdue first."""
    now = now or utcnow()
    query = (select(Export.id, Export.attempt).where(Export.status == ExportStatus.QUEUED,
                                                     or_(Export.resend_at.is_(None), Export.resend_at <= now))
             .order_by(Export.resend_at.is_not(None), Export.resend_at, Export.id).limit(limit))
    sent = [export_id for export_id, attempt in list(session.execute(query))
            if send_export(session=session, broker=broker, export_id=export_id, attempt=attempt)]
    if sent:
        log.info("re-sent %d unclaimed export(s): %s", len(sent), ", ".join(sent))
    return sent


# ---- eval runs: the same wake-up calls, `run_eval(run_id, attempt)` on the gpu queue ----


def send_eval(*, session: Session, broker: Broker, run_id: str, attempt: int) -> bool:
    """Send `run_eval(run_id, attempt)`; record when. False (logged) when the broker is unreachable: the re-send
    loop tries again, the run stays queued."""
    try:
        broker.send_eval(run_id, attempt)
    except Exception as e:
        log.warning("could not send eval run %s (attempt %d) to the broker: %s", run_id, attempt, e)
        return False
    sends = session.scalar(select(EvalRun.send_count).where(EvalRun.id == run_id)) or 0
    session.execute(update(EvalRun).where(EvalRun.id == run_id, EvalRun.attempt == attempt,
                                          EvalRun.status == EvalRunStatus.QUEUED)
                    .values(send_count=EvalRun.send_count + 1,
                            resend_at=utcnow() + resend_wait(broker.settings, sends + 1)))
    session.commit()
    return True


def resend_unclaimed_evals(*, session: Session, broker: Broker, now: datetime | None = None,
                           limit: int = 100) -> list[str]:
    """Re-send the message of every queued eval run not claimed in time, the longest overdue first."""
    now = now or utcnow()
    query = (select(EvalRun.id, EvalRun.attempt).where(EvalRun.status == EvalRunStatus.QUEUED,
                                                       or_(EvalRun.resend_at.is_(None), EvalRun.resend_at <= now))
             .order_by(EvalRun.resend_at.is_not(None), EvalRun.resend_at, EvalRun.id).limit(limit))
    sent = [run_id for run_id, attempt in list(session.execute(query))
            if send_eval(session=session, broker=broker, run_id=run_id, attempt=attempt)]
    if sent:
        log.info("re-sent %d unclaimed eval run(s): %s", len(sent), ", ".join(sent))
    return sent
