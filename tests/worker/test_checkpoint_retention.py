"""Checkpoints kept per job (issue 15): beyond the job's `n_checkpoints`, the oldest are pruned when a new one is
recorded (row, servable model, files), never the one a resume needs nor one something trains from; files a crash
left without a row are swept by the job's next attempt. Real database, real engine (a tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import delete, select

from app.core.errors import APIError
from app.db.models import Checkpoint, Job, JobStatus, Model
from app.services import jobs, lifecycle, models, storage
from tests.worker.conftest import TINY, WorkerEnv, fact_rows
from tests.worker.test_training import at_step, run
from unsloth_core.checkpoint import is_complete


def checkpoint_dir(env: WorkerEnv, job_id: str, attempt: int, step: int) -> Path:
    return storage.attempt_dir(env.settings, job_id, attempt) / "checkpoints" / f"step-{step:06d}"


def model_rows(env: WorkerEnv, job_id: str) -> list[str]:
    with env.ctx.sessions() as session:
        return sorted(session.scalars(select(Model.id).where(Model.job_id == job_id, Model.kind == "checkpoint")))


def resume(env: WorkerEnv, job_id: str) -> None:
    with env.ctx.sessions() as session:
        jobs.resume_job(session=session, broker=env.broker, key=env.key, job_id=job_id)  # type: ignore[arg-type]


def test_a_pause_checkpoint_is_pruned_once_the_job_has_its_n_checkpoints_past_it(
        env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = env.create_job(env.upload(fact_rows(16, seed=4)), n_checkpoints=2)  # 8 steps, checkpoints at 4 and 8
    at_step(monkeypatch, 2, lambda _: env.update_job(job_id, stop_requested="pause"))
    assert run(env, job_id) == "paused"
    monkeypatch.undo()
    resume(env, job_id)
    assert run(env, job_id, attempt=1) == "succeeded"

    assert [c.step_number for c in env.checkpoints(job_id)] == [4, 8]  # step 2 (the pause's) went at step 8
    ft = f"ft:{TINY}::{job_id}"
    assert model_rows(env, job_id) == [f"{ft}:ckpt-step-4", f"{ft}:ckpt-step-8"]
    assert not checkpoint_dir(env, job_id, 0, 2).exists()
    assert all(is_complete(checkpoint_dir(env, job_id, 1, step)) for step in (4, 8))
    with env.ctx.sessions() as session:
        listed = jobs.list_checkpoints(session=session, job=env.job(job_id), after=None, limit=100)
        assert sorted(c.step_number for c in listed.data) == [4, 8]
        with pytest.raises(APIError) as gone:  # what `/v1/models/...` and completions answer for it
            models.resolve_servable(session=session, settings=env.settings, key=env.key,
                                    model_id=f"{ft}:ckpt-step-2")
        assert (gone.value.status, gone.value.code) == (404, "model_not_found")
        kept = models.resolve_servable(session=session, settings=env.settings, key=env.key,
                                       model_id=f"{ft}:ckpt-step-4")
        assert kept.adapter_path == checkpoint_dir(env, job_id, 1, 4).resolve()


def record(env: WorkerEnv, job_id: str, step: int, owner: str = "w/1/1/a") -> Checkpoint:
    """A checkpoint of `step` saved (a directory with a file) and recorded by the job's worker."""
    directory = checkpoint_dir(env, job_id, 0, step)
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(b"weights")
    with env.ctx.sessions() as session:
        row = lifecycle.record_checkpoint(session=session, settings=env.settings, job_id=job_id, attempt=0,
                                          owner=owner, step=step, metrics={}, adapter_dir=directory)
    assert row is not None
    return row


def claimed_job(env: WorkerEnv, n_checkpoints: int) -> str:
    job_id = env.create_job(env.upload(fact_rows(4)), n_checkpoints=n_checkpoints)
    with env.ctx.sessions() as session:
        assert lifecycle.claim_job(session=session, job_id=job_id, attempt=0, owner="w/1/1/a") is not None
    return job_id


def test_the_checkpoint_a_resume_needs_is_kept_whatever_its_step(env: WorkerEnv) -> None:
    """A resume that fell back to an older checkpoint (the last one's files were lost) records lower steps again:
    the newest by step is then not the one the job's next attempt resumes from, and both are kept."""
    job_id = claimed_job(env, n_checkpoints=1)
    record(env, job_id, 8)
    five = record(env, job_id, 5)
    assert env.job(job_id).last_checkpoint_id == five.id
    assert [c.step_number for c in env.checkpoints(job_id)] == [5, 8]
    record(env, job_id, 9)
    assert [c.step_number for c in env.checkpoints(job_id)] == [9]
    assert not checkpoint_dir(env, job_id, 0, 5).exists() and not checkpoint_dir(env, job_id, 0, 8).exists()


@pytest.mark.parametrize("dependent", ["model", "job"])
def test_a_checkpoint_something_trains_from_is_kept(env: WorkerEnv, dependent: str) -> None:
    """A model trained from a checkpoint (its parent), or an unfinished job training from one, keeps it. (The API
    does not fine-tune fine-tuned models yet; the rows are written as such a job would write them.)"""
    job_id = claimed_job(env, n_checkpoints=1)
    four = record(env, job_id, 4)
    job = env.job(job_id)
    with env.ctx.sessions() as session:
        if dependent == "model":
            session.add(Model(id=f"ft:{four.model_id}:child:x", kind="fine_tune", owner_id=env.key.id,
                              parent=four.model_id, root=TINY, path="jobs/elsewhere"))
        else:
            session.add(Job(id=f"ftjob-child-{job_id}", owner_id=env.key.id, model=four.model_id,
                            training_file=job.training_file, seed=1, method=job.method, status=JobStatus.QUEUED,
                            request_hash="x"))
        session.commit()
    try:
        record(env, job_id, 8)
        assert [c.step_number for c in env.checkpoints(job_id)] == [4, 8]
        assert checkpoint_dir(env, job_id, 0, 4).is_dir()
    finally:
        with env.ctx.sessions() as session:  # the session's database is shared: leave no job queued on it
            session.execute(delete(Model).where(Model.parent == four.model_id))
            session.execute(delete(Job).where(Job.model == four.model_id))
            session.commit()


def test_files_a_crash_left_without_a_row_are_swept_by_the_next_attempt(
        env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune deletes the rows, commits, then deletes the files: a worker that dies in between leaves a complete
    checkpoint no row names. The job's next attempt deletes it (and keeps the recorded ones)."""
    job_id = env.create_job(env.upload(fact_rows(16, seed=5)), n_checkpoints=2)  # checkpoints at 4 and 8
    at_step(monkeypatch, 5, lambda _: env.update_job(job_id, stop_requested="pause"))
    assert run(env, job_id) == "paused"
    monkeypatch.undo()
    assert [c.step_number for c in env.checkpoints(job_id)] == [4, 5]
    with env.ctx.sessions() as session:  # the rows of step 4 pruned and committed; its files not deleted yet
        row = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step_number == 4))
        assert row is not None
        session.execute(delete(Model).where(Model.id == row.model_id))
        session.delete(row)
        session.commit()
    orphan = checkpoint_dir(env, job_id, 0, 4)
    assert is_complete(orphan)
    resume(env, job_id)
    assert run(env, job_id, attempt=1) == "succeeded"
    assert not orphan.exists()
    assert is_complete(checkpoint_dir(env, job_id, 0, 5))  # recorded (and resumed from): kept
    assert [c.step_number for c in env.checkpoints(job_id)] == [5, 8]
