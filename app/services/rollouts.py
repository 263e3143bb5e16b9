"""A reinforcement job's rollouts: what the policy wrote for a few prompts at each logged step, with the rewards its
graders gave, so a user can see what it is learning. The worker writes them (`lifecycle.record_rollouts`, fenced);
this module cuts them to size, keeps a job's newest ones, and lists them.

The caps are constants, not settings: they only bound what a job can store, whatever the engine hands over.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.core.json_safe import json_safe
from app.db.base import unix
from app.db.models import Job, JobRollout
from app.schemas.rollouts import RolloutList, RolloutObject
from app.services.common import page

MAX_TEXT = 8_000  # characters in any one string (a completion's text, a prompt, a grader's message)
MAX_COMPLETIONS = 64  # completions kept per prompt (the API's num_generations stops there too)
MAX_PER_STEP = 64  # prompts (rows) kept per logged step
MAX_PER_JOB = 2_000  # rows kept per job: a new step's rows push out its oldest


def capped(sample: dict[str, Any]) -> dict[str, Any]:
    """One prompt's rollout as stored: its completions at most MAX_COMPLETIONS, every string at most MAX_TEXT
    characters, NULs (PostgreSQL's JSONB refuses them) as U+FFFD and non-finite numbers (not JSON) as null. The
    caller's dict is left as it was."""
    out = json_safe(sample, MAX_TEXT)
    if isinstance(out.get("completions"), list):
        out["completions"] = out["completions"][:MAX_COMPLETIONS]
    return out


def prune(session: Session, job_id: str) -> None:
    """Delete the job's rollouts beyond its newest MAX_PER_JOB (uncommitted)."""
    oldest_kept = session.scalar(select(JobRollout.id).where(JobRollout.job_id == job_id)
                                 .order_by(JobRollout.id.desc()).offset(MAX_PER_JOB - 1).limit(1))
    if oldest_kept is not None:
        session.execute(delete(JobRollout).where(JobRollout.job_id == job_id, JobRollout.id < oldest_kept))


def list_rollouts(*, session: Session, job: Job, after: str | None, limit: int, step: int | None) -> RolloutList:
    """Newest first, paged with `after`; only one step's with `step`."""
    query = select(JobRollout).where(JobRollout.job_id == job.id)
    if step is not None:
        query = query.where(JobRollout.step == step)
    rows, more = page(session, query, JobRollout.id, after=after, limit=limit)
    data = [rollout_object(r) for r in rows]
    return RolloutList(data=data, has_more=more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)


def rollout_object(row: JobRollout) -> RolloutObject:
    return RolloutObject(id=row.id, created_at=unix(row.created_at) or 0, step=row.step,
                         prompt=row.data.get("prompt"), completions=row.data.get("completions") or [])
