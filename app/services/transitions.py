"""A job's status changes, in one place: which status may follow which, what a new attempt starts from, and the
write itself.

Every change is one compare-and-set UPDATE: it matches only while the row is still in the status it was read in
(plus whatever fence the caller adds: the attempt, the lease owner), so of two writers racing (a worker's claim and a
cancel, a reaper and a worker's last write) exactly one wins, and the loser changes nothing. The winner's status
event goes in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from app.db.models import Job, JobStatus
from app.services.job_events import status_event

S = JobStatus
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.VALIDATING_FILES: frozenset({S.QUEUED, S.CANCELLED}),
    S.QUEUED: frozenset({S.RUNNING, S.PAUSED, S.CANCELLED}),  # claimed; paused or cancelled by its user
    # A worker's end of an attempt (or the reaper's, for a dead worker); `queued`: requeued as the next attempt.
    S.RUNNING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.PAUSED, S.QUEUED}),
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED}),  # resumed as the next attempt, or cancelled
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


def next_attempt(attempt: int) -> dict[str, Any]:
    """The columns of a job handed back for a new attempt (requeued, resumed, reaped): no lease, no pending stop
    request, no message sent yet for it, and no error left from a pause (storage full). One place, so a new column of
    the send or lease state is reset everywhere."""
    return {"attempt": attempt + 1, "lease_owner": None, "lease_expires_at": None, "stop_requested": None,
            "enqueued_at": None, "resend_at": None, "send_count": 0, "estimated_finish": None, "error": None}


def move(session: Session, job_id: str, *, source: str, to: JobStatus, message: str, attempt: int,
         fence: Sequence[ColumnElement[bool]] = (), values: dict[str, Any] | None = None,
         level: str = "info") -> bool:
    """`source` -> `to`, with `values` and the status event (`message`, for `attempt`), unless the row left `source`
    (or fails `fence`) first: then False and nothing written. The caller commits, or rolls back on False.
    Raises ValueError for a change the lifecycle does not have."""
    source = JobStatus(source)
    if to not in TRANSITIONS[source]:
        raise ValueError(f"a job cannot go from {source} to {to}")
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == source, *fence)
                             .values(status=to, **(values or {})))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.add(status_event(job_id, to, message, attempt=attempt, level=level))
    return True
