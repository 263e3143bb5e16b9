"""The worker's side of an eval run, as fenced writes: claim, lease renewal, each batch's output items recorded with
the run's counters, the end (completed, failed, canceled), a requeue on shutdown, and the reaper that recovers runs
whose worker died.

As for jobs (`lifecycle.py`) and exports (`export_lifecycle.py`), every write a worker makes matches on run id +
attempt + lease owner + status `in_progress`, so a duplicate or stale delivery, or a worker whose lease was taken
over, changes nothing. A batch's output items and the counters they add to are one transaction, and an item is
recorded once per run (a unique index on run + item number): a resumed attempt reads which items are recorded and
grades only the others, so a crash costs at most the batch it was grading.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.core import ids
from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import EvalOutputItem, EvalRun, EvalRunStatus
from app.services.lifecycle import DEFAULT_LEASE, LeaseLost, db_now

log = logging.getLogger("app.eval_lifecycle")


@dataclass(frozen=True)
class GradedItem:
    """One item's output item, ready to record.

    Args:
        criteria_passed: per criterion (by id), whether the answer passed it; empty for an errored item.
        usage: the evaluated model's prompt and completion tokens for this item (0, 0 when nothing was sampled).
    """

    index: int
    item: dict[str, Any]
    sample: dict[str, Any]
    results: list[dict[str, Any]]
    criteria_passed: dict[str, bool]
    usage: tuple[int, int] = (0, 0)

    @property
    def errored(self) -> bool:
        return self.sample.get("error") is not None

    @property
    def passed(self) -> bool:
        return not self.errored and all(self.criteria_passed.values())


def claimable(*, session: Session, run_id: str, attempt: int) -> bool:
    """Whether a `run_eval(run_id, attempt)` message could still claim the run (once False, always)."""
    row = session.execute(select(EvalRun.status, EvalRun.attempt).where(EvalRun.id == run_id)).one_or_none()
    session.rollback()
    return row is not None and (row.status, row.attempt) == (EvalRunStatus.QUEUED, attempt)


def claim_run(*, session: Session, run_id: str, attempt: int, owner: str,
              lease: timedelta = DEFAULT_LEASE) -> EvalRun | None:
    """queued + matching attempt -> in_progress, leased to `owner`. None: a duplicate or stale message."""
    now = db_now(session)
    result = session.execute(update(EvalRun).where(EvalRun.id == run_id, EvalRun.status == EvalRunStatus.QUEUED,
                                                   EvalRun.attempt == attempt)
                             .values(status=EvalRunStatus.IN_PROGRESS, lease_owner=owner, lease_expires_at=now + lease,
                                     started_at=func.coalesce(EvalRun.started_at, now)))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return None
    session.commit()
    return session.get(EvalRun, run_id, populate_existing=True)


def _fenced(session: Session, run_id: str, attempt: int, owner: str, values: dict[str, Any]) -> bool:
    """The first write of a fenced transaction: False (rolled back) when this worker no longer holds the run."""
    result = session.execute(update(EvalRun).where(EvalRun.id == run_id, EvalRun.status == EvalRunStatus.IN_PROGRESS,
                                                   EvalRun.attempt == attempt, EvalRun.lease_owner == owner)
                             .values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    return True


def _hold(session: Session, run_id: str, attempt: int, owner: str) -> EvalRun | None:
    """The run, held for this transaction while this worker owns it (a fenced write first: SQLite has no row lock
    to read under)."""
    if not _fenced(session, run_id, attempt, owner, {"lease_owner": owner}):
        return None
    return session.scalar(select(EvalRun).where(EvalRun.id == run_id).execution_options(populate_existing=True))


def renew_lease(*, session: Session, run_id: str, attempt: int, owner: str,
                lease: timedelta = DEFAULT_LEASE) -> bool:
    """Extend the lease; returns whether a cancel was asked for. Raises LeaseLost."""
    if not _fenced(session, run_id, attempt, owner, {"lease_expires_at": db_now(session) + lease}):
        raise LeaseLost(run_id)
    cancel = bool(session.scalar(select(EvalRun.cancel_requested).where(EvalRun.id == run_id)))
    session.commit()
    return cancel


def read_cancel(*, session: Session, run_id: str, attempt: int, owner: str) -> bool:
    """Whether a cancel was asked for, read now (between batches). Raises LeaseLost."""
    row = session.execute(select(EvalRun.cancel_requested).where(
        EvalRun.id == run_id, EvalRun.status == EvalRunStatus.IN_PROGRESS, EvalRun.attempt == attempt,
        EvalRun.lease_owner == owner)).one_or_none()
    session.rollback()
    if row is None:
        raise LeaseLost(run_id)
    return bool(row.cancel_requested)


def graded_items(*, session: Session, run_id: str) -> set[int]:
    """The item numbers earlier attempts recorded: a resumed attempt grades only the others."""
    return set(session.scalars(select(EvalOutputItem.datasource_item_id).where(EvalOutputItem.run_id == run_id)))


def record_items(*, session: Session, run_id: str, attempt: int, owner: str, items: list[GradedItem]) -> bool:
    """A batch's output items and the run's counters, in one transaction. False when the fence fails."""
    row = _hold(session, run_id, attempt, owner)
    if row is None:
        return False
    counts = dict(row.result_counts)
    per_criterion = [dict(c) for c in row.per_testing_criteria_results]
    usage = [dict(u) for u in row.per_model_usage] or [
        {"model_name": row.model, "invocation_count": 0, "prompt_tokens": 0, "completion_tokens": 0,
         "total_tokens": 0, "cached_tokens": 0}]
    for graded in items:
        session.add(EvalOutputItem(id=ids.new_id(ids.OUTPUT_ITEM), run_id=run_id, eval_id=row.eval_id,
                                   datasource_item_id=graded.index, status="pass" if graded.passed else "fail",
                                   datasource_item=graded.item, sample=graded.sample, results=graded.results))
        outcome = "errored" if graded.errored else "passed" if graded.passed else "failed"
        counts["total"] += 1
        counts[outcome] += 1
        for c in per_criterion:
            if c["testing_criteria"] in graded.criteria_passed:
                c["passed" if graded.criteria_passed[c["testing_criteria"]] else "failed"] += 1
        if not graded.errored:
            prompt, completion = graded.usage
            usage[0].update(invocation_count=usage[0]["invocation_count"] + 1,
                            prompt_tokens=usage[0]["prompt_tokens"] + prompt,
                            completion_tokens=usage[0]["completion_tokens"] + completion,
                            total_tokens=usage[0]["total_tokens"] + prompt + completion)
    session.execute(update(EvalRun).where(EvalRun.id == run_id).values(
        result_counts=counts, per_testing_criteria_results=per_criterion, per_model_usage=usage))
    session.commit()
    return True


def _ended(status: EvalRunStatus, **values: Any) -> dict[str, Any]:
    return {"status": status, "lease_owner": None, "lease_expires_at": None, "finished_at": utcnow(), **values}


def finish_run(*, session: Session, run_id: str, attempt: int, owner: str) -> EvalRunStatus | None:
    """`completed` (every item recorded), or `canceled` when the user asked for that: the items recorded so far
    stay, as OpenAI keeps a canceled run's. Returns the status written, None when the fence fails."""
    row = _hold(session, run_id, attempt, owner)
    if row is None:
        return None
    status = EvalRunStatus.CANCELED if row.cancel_requested else EvalRunStatus.COMPLETED
    session.execute(update(EvalRun).where(EvalRun.id == run_id).values(**_ended(status)))
    session.commit()
    return status


def fail_run(*, session: Session, run_id: str, attempt: int, owner: str, code: str, message: str,
             param: str | None = None) -> EvalRunStatus | None:
    """`failed` with the error; `canceled` when the user had asked for that meanwhile. Returns the status written,
    None when the fence fails."""
    row = _hold(session, run_id, attempt, owner)
    if row is None:
        return None
    if row.cancel_requested:
        status, values = EvalRunStatus.CANCELED, {}
    else:
        status, values = EvalRunStatus.FAILED, {"error": {"code": code, "message": message, "param": param}}
    session.execute(update(EvalRun).where(EvalRun.id == run_id).values(**_ended(status, **values)))
    session.commit()
    return status


def requeue_run(*, session: Session, run_id: str, attempt: int, owner: str) -> int | None:
    """Give the run back (this worker is shutting down): queued as attempt + 1, to send once committed; the next
    attempt continues after the items recorded. Returns the new attempt, None when the fence fails."""
    values = {"status": EvalRunStatus.QUEUED, "attempt": attempt + 1, "lease_owner": None, "lease_expires_at": None,
              "send_count": 0, "resend_at": None}
    if not _fenced(session, run_id, attempt, owner, values):
        return None
    session.commit()
    return attempt + 1


def reap_expired(*, session: Session, settings: Settings, now: datetime | None = None,
                 limit: int = 20) -> list[tuple[str, int]]:
    """Recover in-progress runs whose lease expired (their worker died): requeued as attempt + 1 while under
    `max_job_restarts` (the next attempt continues after the items recorded), else failed; a pending cancel is
    honoured. Returns (run id, attempt) requeued, to send once committed."""
    now = now or db_now(session)
    rows = session.execute(select(EvalRun.id, EvalRun.attempt, EvalRun.restarts, EvalRun.cancel_requested)
                           .where(EvalRun.status == EvalRunStatus.IN_PROGRESS, EvalRun.lease_expires_at < now)
                           .order_by(EvalRun.lease_expires_at).limit(limit).with_for_update(skip_locked=True)).all()
    requeued = []
    for row in rows:
        lost = f"The worker running attempt {row.attempt} stopped responding (its lease expired)"
        values: dict[str, Any] = {"attempt": row.attempt + 1, "lease_owner": None, "lease_expires_at": None,
                                  "send_count": 0, "resend_at": None, "restarts": row.restarts + 1}
        if row.cancel_requested:
            values.update(status=EvalRunStatus.CANCELED, finished_at=now)
        elif row.restarts >= settings.max_job_restarts:
            values.update(status=EvalRunStatus.FAILED, finished_at=now, error={
                "code": "worker_lost", "param": None, "message": f"{lost}; it stopped {row.restarts + 1} times "
                "(crashed, was killed, or ran out of memory), so it was not retried again."})
        else:
            values.update(status=EvalRunStatus.QUEUED)
        result = session.execute(update(EvalRun).where(EvalRun.id == row.id,
                                                       EvalRun.status == EvalRunStatus.IN_PROGRESS,
                                                       EvalRun.attempt == row.attempt).values(**values))
        if result.rowcount != 1:  # type: ignore[attr-defined]
            continue
        if values["status"] == EvalRunStatus.QUEUED:
            requeued.append((row.id, row.attempt + 1))
        log.warning("eval run %s: lease expired (attempt %d): %s", row.id, row.attempt, values["status"])
    session.commit()
    return requeued
