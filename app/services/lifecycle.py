"""The worker's side of a job's life, as fenced writes: claim, checkpoints, success. Each write matches on job id +
attempt + lease owner (+ status), so a stale or duplicate delivery, or a worker whose lease was taken over, changes
nothing. The worker issue builds heartbeats, failures, pause/cancel finalisation and the reaper on the same pattern.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core import ids
from app.core.config import Settings
from app.db.base import utcnow
from app.db.models import Checkpoint, Job, Model
from app.services.jobs import new_event
from app.services.models import checkpoint_model_id, fine_tuned_model_id

DEFAULT_LEASE = timedelta(seconds=90)


def _fence(job_id: str, attempt: int, owner: str) -> Any:
    return (Job.id == job_id) & (Job.attempt == attempt) & (Job.lease_owner == owner) & (Job.status == "running")


def claim_job(*, session: Session, job_id: str, attempt: int, owner: str,
              lease: timedelta = DEFAULT_LEASE) -> Job | None:
    """queued + matching attempt -> running, leased to `owner`. None: a duplicate or stale message (drop it)."""
    now = utcnow()
    result = session.execute(update(Job).where(Job.id == job_id, Job.attempt == attempt, Job.status == "queued")
                             .values(status="running", lease_owner=owner, lease_expires_at=now + lease,
                                     heartbeat_at=now, started_at=now))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return None
    session.add(new_event(job_id, "Fine-tuning job started"))
    session.commit()
    return session.get(Job, job_id, populate_existing=True)


def _relative(settings: Settings, path: Path) -> str:
    path = path.resolve()
    if not path.is_relative_to(settings.jobs_dir.resolve()):
        raise ValueError(f"{path} is not inside the jobs dir {settings.jobs_dir}")
    return str(path.relative_to(settings.data_dir.resolve()))


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.jobs_dir / job_id


def record_checkpoint(*, session: Session, settings: Settings, job_id: str, attempt: int, owner: str, step: int,
                      metrics: dict[str, Any], adapter_dir: Path) -> Checkpoint | None:
    """A saved (complete) adapter checkpoint becomes a row, a servable model id and an event, in one fenced
    transaction. None when the fence fails (this worker no longer owns the job)."""
    job = session.scalar(select(Job).where(_fence(job_id, attempt, owner)).with_for_update())
    if job is None:
        session.rollback()
        return None
    ft_id = fine_tuned_model_id(job.model, job.suffix, job.id)
    model_id = checkpoint_model_id(ft_id, step)
    relative = _relative(settings, adapter_dir)
    existing = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step_number == step))
    if existing is not None:  # the same step again after a resume: the newer files replace it in place
        existing.path, existing.metrics, existing.attempt = relative, {"step": step, **metrics}, attempt
        checkpoint = existing
    else:
        checkpoint = Checkpoint(id=ids.new_id(ids.CHECKPOINT), job_id=job_id, attempt=attempt, step_number=step,
                                metrics={"step": step, **metrics}, path=relative, model_id=model_id)
        session.add(checkpoint)
        session.add(Model(id=model_id, kind="checkpoint", owner_id=job.owner_id, parent=ft_id, root=job.model,
                          job_id=job_id, checkpoint_id=checkpoint.id, path=relative))
    job.last_checkpoint_id = checkpoint.id
    session.add(new_event(job_id, f"Checkpoint saved at step {step}", type="metrics",
                          data={"step": step, "checkpoint": model_id, **metrics}))
    session.commit()
    return checkpoint


def complete_job(*, session: Session, settings: Settings, job_id: str, attempt: int, owner: str, adapter_dir: Path,
                 trained_tokens: int | None = None) -> str | None:
    """Final adapter saved: the fine-tune's model row, `fine_tuned_model`, status `succeeded`. Returns the model id,
    None when the fence fails."""
    job = session.scalar(select(Job).where(_fence(job_id, attempt, owner)).with_for_update())
    if job is None:
        session.rollback()
        return None
    ft_id = fine_tuned_model_id(job.model, job.suffix, job.id)
    session.add(Model(id=ft_id, kind="fine_tune", owner_id=job.owner_id, parent=job.model, root=job.model,
                      job_id=job_id, path=_relative(settings, adapter_dir)))
    now = utcnow()
    job.status, job.fine_tuned_model, job.trained_tokens = "succeeded", ft_id, trained_tokens
    job.finished_at, job.lease_owner, job.lease_expires_at, job.stop_requested = now, None, None, None
    session.add(new_event(job_id, f"New fine-tuned model created: {ft_id}"))
    session.add(new_event(job_id, "The job has successfully completed"))
    session.commit()
    return ft_id
