"""The worker's side of a job's life, as fenced writes: claim, lease renewal, metrics, checkpoints, the end (succeeded,
failed, cancelled, paused, requeued), and the reaper that recovers jobs whose worker died.

Every write a worker makes matches on job id + attempt + lease owner + status `running` (the fence), so a stale or
duplicate delivery, or a worker whose lease was taken over, changes nothing: its UPDATE matches zero rows. `attempt`
is the fencing token: every requeue increments it, and the broker message carries it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from app.core import ids
from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import Checkpoint, File, Job, JobRollout, JobStatus, Model
from app.services import checkpoint_retention, job_results, rollouts, storage
from app.services.job_events import new_event
from app.services.models import checkpoint_model_id, fine_tuned_model_id, root_of
from app.services.storage import attempt_dir as attempt_dir  # re-exported: tests.load and fixtures name them here
from app.services.storage import job_dir as job_dir
from app.services.transitions import move, next_attempt

log = logging.getLogger("app.lifecycle")

DEFAULT_LEASE = timedelta(seconds=90)


class LeaseLost(Exception):
    """This worker no longer holds the job (the reaper requeued it, or it was finished elsewhere): stop, write
    nothing more."""


def _holds(attempt: int, owner: str) -> tuple[ColumnElement[bool], ...]:
    """The fence, less the status: this attempt, leased to this owner."""
    return Job.attempt == attempt, Job.lease_owner == owner


def _fenced_update(session: Session, job_id: str, attempt: int, owner: str, values: dict[str, Any]) -> bool:
    """The first write of a fenced transaction: False (rolled back) when this worker no longer holds the job. On
    PostgreSQL the row stays locked until commit, so what the transaction adds next is atomic with the check."""
    result = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING,
                                               *_holds(attempt, owner)).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    return True


def _end_attempt(session: Session, job_id: str, attempt: int, owner: str, to: JobStatus, message: str, *,
                 values: dict[str, Any], event_attempt: int | None = None, level: str = "info") -> bool:
    """This worker's attempt ends: running -> `to`, fenced, with its status event (uncommitted). False (rolled
    back) when this worker no longer holds the job."""
    if not move(session, job_id, source=JobStatus.RUNNING, to=to, message=message, fence=_holds(attempt, owner),
                attempt=attempt if event_attempt is None else event_attempt, values=values, level=level):
        session.rollback()
        return False
    return True


def _hold(session: Session, job_id: str, attempt: int, owner: str) -> Job | None:
    """The job, held for this transaction when this worker still owns it (else None, rolled back).

    The hold is a fenced write (the lease owner set to itself): a `SELECT ... FOR UPDATE` locks the row on
    PostgreSQL but is a plain read on SQLite, where the reaper could then requeue the job between this worker's
    read and its commit, and the commit would overwrite the reaped job's outcome. A write takes SQLite's write lock
    (and PostgreSQL's row lock) at once, atomically with the fence."""
    if not _fenced_update(session, job_id, attempt, owner, {"lease_owner": owner}):
        return None
    return session.scalar(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))


# ---- claim and lease ----


def db_now(session: Session) -> datetime:
    """The time by the database's clock. Leases are written by workers and judged by the reaper, which may run on
    other hosts: on PostgreSQL all of them read one clock, so a host whose clock drifts neither loses a lease early
    nor keeps a dead one. SQLite lives on one host, where the process clock is that clock."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.scalar(select(func.clock_timestamp()))
        assert value is not None
        return value.astimezone(UTC)
    return utcnow()


def claimable(*, session: Session, job_id: str, attempt: int) -> bool:
    """Whether a `train(job_id, attempt)` message could still claim the job. Once False it stays False (a claim or
    a requeue moves the job on, and attempts only grow): the message is a duplicate or stale and can be dropped."""
    row = session.execute(select(Job.status, Job.attempt).where(Job.id == job_id)).one_or_none()
    session.rollback()
    return row is not None and (row.status, row.attempt) == (JobStatus.QUEUED, attempt)


def claim_job(*, session: Session, job_id: str, attempt: int, owner: str,
              lease: timedelta = DEFAULT_LEASE) -> Job | None:
    """queued + matching attempt -> running, leased to `owner`. None: a duplicate or stale message (drop it)."""
    now = db_now(session)
    message = "Fine-tuning job started" if attempt == 0 else f"Fine-tuning job started (attempt {attempt})"
    values = {"lease_owner": owner, "lease_expires_at": now + lease, "heartbeat_at": now,
              "started_at": func.coalesce(Job.started_at, now)}
    if not move(session, job_id, source=JobStatus.QUEUED, to=JobStatus.RUNNING, message=message, attempt=attempt,
                fence=[Job.attempt == attempt], values=values):
        session.rollback()
        return None
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def renew_lease(*, session: Session, job_id: str, attempt: int, owner: str,
                lease: timedelta = DEFAULT_LEASE) -> str | None:
    """Extend the lease; returns the job's stop request (cancel, pause, preempt or None). Raises LeaseLost."""
    now = db_now(session)
    if not _fenced_update(session, job_id, attempt, owner, {"heartbeat_at": now, "lease_expires_at": now + lease}):
        raise LeaseLost(job_id)
    stop = session.scalar(select(Job.stop_requested).where(Job.id == job_id))
    session.commit()
    return stop


def read_stop_request(*, session: Session, job_id: str, attempt: int, owner: str) -> str | None:
    """The stop request, read between training steps (a cheap primary-key read). Raises LeaseLost."""
    row = session.execute(select(Job.attempt, Job.lease_owner, Job.status, Job.stop_requested)
                          .where(Job.id == job_id)).one_or_none()
    session.rollback()  # end the read transaction: SQLite readers would otherwise pin an old snapshot
    if row is None or (row.attempt, row.lease_owner, row.status) != (attempt, owner, JobStatus.RUNNING):
        raise LeaseLost(job_id)
    return row.stop_requested


# ---- while training ----


def record_metrics(*, session: Session, job_id: str, attempt: int, owner: str, message: str,
                   data: dict[str, Any], progress: dict[str, Any], estimated_finish: datetime | None = None) -> None:
    """A metrics event and the job's progress, in one fenced transaction. Raises LeaseLost."""
    values = {"progress": progress, "estimated_finish": estimated_finish}
    if not _fenced_update(session, job_id, attempt, owner, values):
        raise LeaseLost(job_id)
    session.add(new_event(job_id, message, type="metrics", data=data))
    session.commit()


def record_event(*, session: Session, job_id: str, attempt: int, owner: str, message: str,
                 level: str = "info", data: dict[str, Any] | None = None) -> None:
    """A message event, only while this worker holds the job. Raises LeaseLost."""
    if not _fenced_update(session, job_id, attempt, owner, {"heartbeat_at": utcnow()}):
        raise LeaseLost(job_id)
    session.add(new_event(job_id, message, level=level, data=data))
    session.commit()


def record_rollouts(*, session: Session, job_id: str, attempt: int, owner: str, step: int,
                    samples: list[dict[str, Any]]) -> None:
    """A reinforcement job's sampled rollouts at `step` (the engine's `on_rollouts`: one dict per prompt, with its
    completions), one row per prompt, only while this worker holds the job. Raises LeaseLost.

    What is kept is capped (`app.services.rollouts`): at most 64 prompts per step and 64 completions per prompt,
    every string (a completion's text, the prompt) cut to 8,000 characters, non-finite numbers stored as null; and
    a job keeps its newest 2,000 rows, the oldest beyond that deleted in the same transaction."""
    if not _fenced_update(session, job_id, attempt, owner, {"heartbeat_at": utcnow()}):
        raise LeaseLost(job_id)
    session.add_all(JobRollout(id=ids.new_id(ids.ROLLOUT), job_id=job_id, step=step, data=rollouts.capped(sample))
                    for sample in samples[:rollouts.MAX_PER_STEP])
    session.flush()
    rollouts.prune(session, job_id)
    session.commit()


def record_checkpoint(*, session: Session, settings: Settings, job_id: str, attempt: int, owner: str, step: int,
                      metrics: dict[str, Any], adapter_dir: Path) -> Checkpoint | None:
    """A saved (complete) adapter checkpoint becomes a row, a servable model id and an event, in one fenced
    transaction that also prunes the job's checkpoints beyond its `n_checkpoints` (their files are deleted once it
    has committed). None when the fence fails (this worker no longer owns the job)."""
    job = _hold(session, job_id, attempt, owner)
    if job is None:
        return None
    root = root_of(session, job.model)
    ft_id = fine_tuned_model_id(root, job.suffix, job.id)
    model_id = checkpoint_model_id(ft_id, step)
    relative = storage.artifact_relative(settings, adapter_dir)
    existing = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step_number == step))
    if existing is not None:  # the same step again after a resume: the newer files replace it
        existing.path, existing.metrics, existing.attempt = relative, {"step": step, **metrics}, attempt
        session.execute(update(Model).where(Model.id == existing.model_id).values(path=relative))
        checkpoint = existing
    else:
        checkpoint = Checkpoint(id=ids.new_id(ids.CHECKPOINT), job_id=job_id, attempt=attempt, step_number=step,
                                metrics={"step": step, **metrics}, path=relative, model_id=model_id)
        session.add(checkpoint)
        session.add(Model(id=model_id, kind="checkpoint", owner_id=job.owner_id, parent=ft_id, root=root,
                          job_id=job_id, checkpoint_id=checkpoint.id, path=relative))
    job.last_checkpoint_id = checkpoint.id
    session.add(new_event(job_id, f"Checkpoint saved at step {step}", type="metrics",
                          data={"step": step, "checkpoint": model_id,
                                **{k: v for k, v in metrics.items() if k != "samples"}}))
    pruned = checkpoint_retention.prune(session, job)
    session.commit()
    for path in pruned:  # only now: a crash before this line leaves orphan files, never a row naming none
        storage.remove_artifact(settings, path)
    return checkpoint


def resume_checkpoint(*, session: Session, settings: Settings, job: Job,
                      usable: Callable[[Path], bool] = Path.is_dir) -> tuple[Checkpoint, Path] | None:
    """The checkpoint a new attempt continues from: the one the database last recorded for the job (never "the
    newest directory on disk"), if its files are still `usable` (complete); otherwise the newest recorded one that
    is. None: start from the beginning."""
    rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)
                                .order_by(Checkpoint.step_number.desc())))
    rows.sort(key=lambda r: r.id != job.last_checkpoint_id)  # the recorded last one first, then newest first
    for row in rows:
        path = storage.job_artifact(settings, job.id, row.path)
        if path is not None and usable(path):
            return row, path
        log.warning("job %s: checkpoint at step %d is missing or incomplete; not resuming from it", job.id,
                    row.step_number)
    return None


def recorded_checkpoint_dirs(*, session: Session, settings: Settings, job_id: str) -> set[Path]:
    """Where the job's recorded checkpoints are, resolved: what a sweep of its directories keeps."""
    paths = session.scalars(select(Checkpoint.path).where(Checkpoint.job_id == job_id))
    return {(settings.data_dir / p).resolve() for p in paths}


# ---- the end of an attempt ----


def _ended(now: datetime) -> dict[str, Any]:
    return {"lease_owner": None, "lease_expires_at": None, "stop_requested": None, "finished_at": now}


def complete_job(*, session: Session, settings: Settings, job_id: str, attempt: int, owner: str, adapter_dir: Path,
                 trained_tokens: int | None = None, manifest: dict[str, Any] | None = None) -> str | None:
    """Final adapter saved: the fine-tune's model row, `fine_tuned_model`, its result files (the step-metrics CSV and,
    given one, the manifest: job_results.py), status `succeeded`. Returns the model id, None when the fence fails."""
    job = _hold(session, job_id, attempt, owner)
    if job is None:
        return None
    results = job_results.write_result_files(session, settings, job, manifest or {})
    try:
        return _complete(session, settings, job, attempt, owner, adapter_dir, trained_tokens, results)
    except BaseException:
        session.rollback()
        job_results.remove_result_files(settings, results)
        raise


def _complete(session: Session, settings: Settings, job: Job, attempt: int, owner: str, adapter_dir: Path,
              trained_tokens: int | None, results: list[File]) -> str | None:
    job_id = job.id
    root = root_of(session, job.model)  # the job may continue a fine-tune: its parent is that, its root the base
    ft_id = fine_tuned_model_id(root, job.suffix, job.id)
    session.add(Model(id=ft_id, kind="fine_tune", owner_id=job.owner_id, parent=job.model, root=root,
                      job_id=job_id, path=storage.artifact_relative(settings, adapter_dir)))
    session.add(new_event(job_id, f"New fine-tuned model created: {ft_id}"))
    values = {"fine_tuned_model": ft_id, "trained_tokens": trained_tokens, "estimated_finish": None,
              "result_files": [f.id for f in results], **_ended(utcnow())}
    if not _end_attempt(session, job_id, attempt, owner, JobStatus.SUCCEEDED, "The job has successfully completed",
                        values=values):
        job_results.remove_result_files(settings, results)  # rolled back: their rows are gone
        return None
    session.commit()
    return ft_id


def fail_job(*, session: Session, job_id: str, attempt: int, owner: str, code: str, message: str,
             param: str | None = None) -> bool:
    """A failure the user can act on: status `failed` with the error object. False when the fence fails."""
    error = {"code": code, "message": message, "param": param}
    values = {"error": error, "estimated_finish": None, **_ended(utcnow())}
    if not _end_attempt(session, job_id, attempt, owner, JobStatus.FAILED, f"The job failed: {message}",
                        values=values, level="error"):
        return False
    session.commit()
    return True


def stop_job(*, session: Session, job_id: str, attempt: int, owner: str, status: JobStatus, step: int,
             error: dict[str, Any] | None = None) -> JobStatus | None:
    """Training stopped: on request, `cancelled` or `paused` (its checkpoint already recorded); or `paused` with an
    `error` ({code, message, param}) saying why it could not go on (its storage is full): the user resumes it once
    that is mended, from its last recorded checkpoint. A cancel that arrived meanwhile wins over a pause. Returns the
    status written, None when the fence fails."""
    job = _hold(session, job_id, attempt, owner)  # read stop_requested under the lock: a cancel cannot slip by
    if job is None:
        return None
    if status == JobStatus.PAUSED and job.stop_requested == "cancel":
        status, error = JobStatus.CANCELLED, None
    ended = _ended(utcnow()) if status == JobStatus.CANCELLED else {"lease_owner": None, "lease_expires_at": None,
                                                                     "stop_requested": None}
    if status == JobStatus.CANCELLED:
        message = f"Fine-tuning job cancelled at step {step}"
    elif error is not None:
        message = f"Fine-tuning job paused at step {step}: {error['message']}"
    else:
        message = f"Fine-tuning job paused at step {step}; resume it to continue from its last checkpoint"
    values = {"estimated_finish": None, **ended, **({"error": error} if error else {})}
    if not _end_attempt(session, job_id, attempt, owner, status, message, values=values,
                        level="error" if error else "info"):
        return None
    session.commit()
    return status


def requeue_job(*, session: Session, job_id: str, attempt: int, owner: str, reason: str) -> int | None:
    """Give the job back (the worker is shutting down): queued again as attempt + 1, to continue from its last
    checkpoint on the next worker. Returns the new attempt, None when the fence fails."""
    if not _end_attempt(session, job_id, attempt, owner, JobStatus.QUEUED, f"{reason}; requeued as attempt "
                        f"{attempt + 1}", values=next_attempt(attempt), event_attempt=attempt + 1):
        return None
    session.commit()
    return attempt + 1


def preempt_jobs(*, session: Session, owner_prefix: str) -> int:
    """Ask every running job leased under `owner_prefix` (one worker node) to checkpoint and give itself back.
    A cancel or pause already asked for is left as it is."""
    result = session.execute(update(Job).where(Job.status == JobStatus.RUNNING, Job.stop_requested.is_(None),
                                               Job.lease_owner.startswith(owner_prefix, autoescape=True))
                             .values(stop_requested="preempt"))
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]


# ---- the reaper ----


def reap_expired(*, session: Session, settings: Settings, now: datetime | None = None,
                 limit: int = 20) -> list[tuple[str, int]]:
    """Recover running jobs whose lease expired (their worker died): requeued as attempt + 1 while under
    `max_job_restarts`, else failed; a pending cancel or pause is honoured instead. Returns (job id, attempt) of the
    jobs requeued, to send once committed. Several reapers may run: rows one holds are skipped, not waited for."""
    now = now or db_now(session)
    rows = session.execute(select(Job.id, Job.attempt, Job.restarts, Job.stop_requested)
                           .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
                           .order_by(Job.lease_expires_at).limit(limit).with_for_update(skip_locked=True)).all()
    requeued = []
    for row in rows:
        status, event, extra = _reaped(settings, row.attempt, row.restarts, row.stop_requested, now)
        if not move(session, row.id, source=JobStatus.RUNNING, to=status, message=event, attempt=row.attempt + 1,
                    fence=[Job.attempt == row.attempt], values={**next_attempt(row.attempt), **extra},
                    level="error" if status == JobStatus.FAILED else "warn"):
            continue
        if status == JobStatus.QUEUED:
            requeued.append((row.id, row.attempt + 1))
        log.warning("job %s: lease expired (attempt %d): %s", row.id, row.attempt, status)
    session.commit()
    return requeued


def _reaped(settings: Settings, attempt: int, restarts: int, stop: str | None,
            now: datetime) -> tuple[JobStatus, str, dict[str, Any]]:
    lost = f"The worker running attempt {attempt} stopped responding (its lease expired)"
    if stop == "cancel":
        return JobStatus.CANCELLED, f"{lost}; the job is cancelled, as requested", {"finished_at": now}
    if stop == "pause":
        return JobStatus.PAUSED, f"{lost}; the job is paused, as requested: resume it to continue", {}
    if restarts >= settings.max_job_restarts:
        message = (f"The job's worker stopped {restarts + 1} times (crashed, was killed, or ran out of host "
                   "memory), so it was not retried again. If it ran out of memory, lower batch_size or "
                   "max_seq_length and create the job again.")
        return JobStatus.FAILED, f"{lost}; the job failed", {
            "finished_at": now, "restarts": restarts + 1,
            "error": {"code": "worker_lost", "message": message, "param": None}}
    return JobStatus.QUEUED, f"{lost}; requeued as attempt {attempt + 1} to continue from its last checkpoint", {
        "restarts": restarts + 1}
