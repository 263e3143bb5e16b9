"""How many checkpoints a job keeps: its `n_checkpoints`. Pauses and preemptions add checkpoints beyond the evenly
spaced ones, and each is a servable model with files on disk, so when a new one is recorded the oldest (lowest step)
beyond the newest `n_checkpoints` go: the checkpoint row, its model row, then its files.

Never pruned: the job's `last_checkpoint_id` (the next attempt resumes from it), and a checkpoint another model was
trained from (its `parent`) or an unfinished job trains from (its `model`).

The rows go in the transaction that records the new checkpoint; the files only once it has committed, so a crash in
between leaves files no row names, never a row naming missing files. Such orphans (and torn writes) in a job's earlier
attempts are swept by the worker that runs its next attempt (`worker.training.sweep_earlier_attempts`).
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.db.models import TERMINAL_STATUSES, Checkpoint, Job, Model
from app.services import hyperparameters


def kept_per_job(job: Job) -> int | None:
    """The job's `n_checkpoints` (None for a job stored before it was resolved: keep all)."""
    value = hyperparameters.stored_hyperparameters(job.method).get("n_checkpoints")
    return int(value) if value else None


def prune(session: Session, job: Job) -> list[str]:
    """Delete, in this transaction, the rows of the job's checkpoints beyond its `n_checkpoints`; returns their
    paths (relative to the data dir), to delete once the transaction has committed."""
    keep = kept_per_job(job)
    if keep is None:
        return []
    rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)
                                .order_by(Checkpoint.step_number.desc())))
    old = [r for r in rows[keep:] if r.id != job.last_checkpoint_id]
    needed = _depended_on(session, [r.model_id for r in old])
    pruned = [r for r in old if r.model_id not in needed]
    if pruned:
        session.execute(delete(Model).where(Model.id.in_([r.model_id for r in pruned]), Model.kind == "checkpoint"))
        session.execute(delete(Checkpoint).where(Checkpoint.id.in_([r.id for r in pruned])))
    return [r.path for r in pruned]


def _depended_on(session: Session, model_ids: list[str]) -> set[str]:
    """Of `model_ids`, those a model was trained from or an unfinished job trains from."""
    if not model_ids:
        return set()
    parents = session.scalars(select(Model.parent).where(Model.parent.in_(model_ids), Model.deleted_at.is_(None)))
    bases = session.scalars(select(Job.model).where(Job.model.in_(model_ids), Job.status.not_in(TERMINAL_STATUSES)))
    return {m for m in (*parents, *bases) if m is not None}
