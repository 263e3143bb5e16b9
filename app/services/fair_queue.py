"""Which queued job a worker takes when a train message arrives: fair across API keys.

Messages are wake-up calls; a worker may serve any queued job. Taken in message order, a key that queued 1,000 jobs
would hold every worker for its 1,000 before another key's first job ran. So a worker first asks which key has
waited longest: the key whose most recent job start is the oldest (a key that never started one first). When that
is not the message's key, the worker takes that key's oldest queued job instead and sends the message's job again
(to the back of the queue: no job is left without a message). A key alone on the service runs in message order.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus


def pick(session: Session, job_id: str, attempt: int) -> tuple[str, int]:
    """(job, attempt) to claim for the message (job_id, attempt): the message's own job, or the oldest queued job
    of the key that has waited longest. A stale message (its job not queued at that attempt) is left as it is."""
    job = session.get(Job, job_id)
    if job is None or job.status != JobStatus.QUEUED or job.attempt != attempt:
        return job_id, attempt
    mine = _last_start(session, job.owner_id)
    if mine is None:  # the message's key never started a job: nobody has waited longer
        return job_id, attempt
    waiting = (select(Job.owner_id).where(Job.status == JobStatus.QUEUED, Job.owner_id != job.owner_id).distinct()
               .subquery())
    last = (select(Job.owner_id, func.max(Job.started_at).label("last")).group_by(Job.owner_id).subquery())
    oldest = (select(Job.owner_id, func.min(Job.created_at).label("oldest")).where(Job.status == JobStatus.QUEUED)
              .group_by(Job.owner_id).subquery())
    other = session.execute(
        select(waiting.c.owner_id, last.c.last)
        .join(last, last.c.owner_id == waiting.c.owner_id).join(oldest, oldest.c.owner_id == waiting.c.owner_id)
        .order_by(last.c.last.is_not(None), last.c.last, oldest.c.oldest).limit(1)).first()
    if other is None or (other.last is not None and other.last >= mine):
        return job_id, attempt
    row = session.execute(select(Job.id, Job.attempt).where(Job.status == JobStatus.QUEUED,
                                                            Job.owner_id == other.owner_id)
                          .order_by(Job.created_at, Job.id).limit(1)).first()
    return (row.id, row.attempt) if row is not None else (job_id, attempt)


def _last_start(session: Session, owner_id: str) -> datetime | None:
    return session.scalar(select(func.max(Job.started_at)).where(Job.owner_id == owner_id))
