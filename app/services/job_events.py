"""A job's events: the messages and metrics its user reads, and the status events, one per transition, that make the
events the job's audit trail (exactly one terminal transition per job, attempts that only grow)."""

from __future__ import annotations

from typing import Any

from app.core import ids
from app.db.models import JobEvent, JobStatus


def new_event(job_id: str, message: str, *, level: str = "info", type: str = "message",
              data: dict[str, Any] | None = None) -> JobEvent:
    return JobEvent(id=ids.new_id(ids.EVENT), job_id=job_id, level=level, type=type, message=message, data=data)


def status_event(job_id: str, status: JobStatus, message: str, *, attempt: int, level: str = "info") -> JobEvent:
    """An event marking a status transition, with the attempt it concerns (the one that runs or ended; for `queued`,
    the one that will run)."""
    return new_event(job_id, message, level=level, data={"status": str(status), "attempt": attempt})
