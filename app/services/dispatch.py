"""Sending train messages: always after the job row is committed, and again for queued jobs whose message was lost.

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
from app.db.models import Job

log = logging.getLogger("app.dispatch")


def send_train(*, session: Session, broker: Broker, job_id: str, attempt: int) -> bool:
    """Send `train(job_id, attempt)`; record when. False (logged) when the broker is unreachable: the re-send loop
    will try again, the job stays queued."""
    try:
        broker.send_train(job_id, attempt)
    except Exception as e:
        log.warning("could not send job %s (attempt %d) to the broker: %s", job_id, attempt, e)
        return False
    session.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "queued")
                    .values(enqueued_at=utcnow(), send_count=Job.send_count + 1))
    session.commit()
    return True


def resend_due(job: Job, settings: Settings, now: datetime) -> bool:
    if job.enqueued_at is None:
        return True
    wait = min(settings.resend_after_s * 2 ** max(job.send_count - 1, 0), settings.resend_max_interval_s)
    return now - job.enqueued_at >= timedelta(seconds=wait)


def resend_unclaimed(*, session: Session, broker: Broker, settings: Settings, now: datetime | None = None,
                     limit: int = 100) -> list[str]:
    """Re-send the message of every queued job not claimed in time (the worker's beat calls this periodically).
    Returns the ids sent."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.resend_after_s)
    query = (select(Job).where(Job.status == "queued", or_(Job.enqueued_at.is_(None), Job.enqueued_at <= cutoff))
             .order_by(Job.id).limit(limit))
    sent = []
    for job in list(session.scalars(query)):
        if resend_due(job, settings, now) and send_train(session=session, broker=broker, job_id=job.id,
                                                         attempt=job.attempt):
            sent.append(job.id)
    if sent:
        log.info("re-sent %d unclaimed job(s): %s", len(sent), ", ".join(sent))
    return sent
