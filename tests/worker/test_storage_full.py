"""A full disk (issue 15), on a small tmpfs of its own: an atomic write that hits ENOSPC leaves nothing behind, and a
job whose checkpoint cannot be written pauses (error `storage_full`) with no torn checkpoint recorded, then, once
space is back, resumes from its last good checkpoint to the same adapter as a run that never stopped. The same when
what cannot be written is the checkpoint's or the final adapter's row (the embedded mode's SQLite database is on that
disk too); when not even the pause can be written, the job is left to the lease reaper."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from app.core.config import load_settings
from app.db import migrate
from app.db.base import utcnow
from app.db.models import JobStatus
from app.services import jobs, keys, lifecycle, storage
from tests.small_disk import fill, fill_database, small_disk, sqlite_file
from tests.worker.conftest import TINY, RecordingBroker, WorkerEnv, fact_rows, worker_settings
from tests.worker.test_training import assert_same, at_step, final_adapter, metric_steps, run
from unsloth_core.checkpoint import atomic_directory, is_complete
from worker import training
from worker.context import WorkerContext


@pytest.mark.parametrize("where", ["files", "manifest"])
def test_an_atomic_write_that_fills_the_disk_leaves_nothing(tmp_path: Path, where: str) -> None:
    """`files`: the disk fills while the files are written; `manifest`: after they are renamed into place, as the
    manifest is written (the directory would be there, torn)."""
    with small_disk(tmp_path / "disk", "256k") as disk:
        final = disk / "step-000004"
        with pytest.raises(OSError) as e, atomic_directory(final) as tmp:
            (tmp / "adapter_model.safetensors").write_bytes(b"w" * 4096)
            fill(disk)
            if where == "files":
                (tmp / "optimizer.safetensors").write_bytes(b"o" * 65536)
        assert e.value.errno == errno.ENOSPC
        assert sorted(p.name for p in disk.iterdir()) == [".filler"]


def test_a_job_whose_checkpoint_fills_the_disk_pauses_and_resumes_from_its_last_good_one(
        env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    training_file = env.upload(fact_rows(16, seed=8))
    straight = env.create_job(training_file, n_checkpoints=4)  # 8 steps, a checkpoint every 2
    assert run(env, straight) == "succeeded"

    job_id = env.create_job(training_file, n_checkpoints=4)
    with small_disk(storage.job_dir(env.settings, job_id), "4m") as disk:
        filler: list[Path] = []
        at_step(monkeypatch, 3, lambda _: filler.append(fill(disk, leave=8192)))  # step 4's checkpoint cannot fit
        assert run(env, job_id) == "paused"
        monkeypatch.undo()
        job = env.job(job_id)
        assert (job.status, job.lease_owner, job.stop_requested) == (JobStatus.PAUSED, None, None)
        assert job.error is not None and job.error["code"] == "storage_full"
        assert "storage is full" in job.error["message"] and "last checkpoint (step 2)" in job.error["message"]
        paused = [e for e in env.events(job_id) if (e.data or {}).get("status") == "paused"]
        assert len(paused) == 1 and paused[0].level == "error" and "storage is full" in paused[0].message
        assert [c.step_number for c in env.checkpoints(job_id)] == [2]
        steps = sorted(disk.glob("attempt-*/checkpoints/*"))
        assert [p.name for p in steps] == ["step-000002"] and is_complete(steps[0])  # nothing torn left

        filler[0].unlink()  # space is back
        with env.ctx.sessions() as session:
            jobs.resume_job(session=session, broker=env.broker, key=env.key, job_id=job_id)  # type: ignore[arg-type]
        assert env.job(job_id).error is None
        assert run(env, job_id, attempt=1) == "succeeded"
        assert any("Resuming from the checkpoint at step 2" in e.message for e in env.events(job_id))
        assert metric_steps(env, job_id) == [1, 2, 3, 4, *range(3, 9)]  # 1-4, then 3-8 from step 2's checkpoint
        assert_same(final_adapter(env, job_id), final_adapter(env, straight))


# ---- the database's disk (issue 15): SQLite's SQLITE_FULL, "database or disk is full" ----


@contextlib.contextmanager
def worker_env(data_dir: Path, tiny_base: Path, **overrides: Any) -> Iterator[WorkerEnv]:
    """A worker on SQLite, its database in `data_dir` as the embedded mode keeps it (or where `database_url` says)."""
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / TINY).symlink_to(tiny_base, target_is_directory=True)
    settings = load_settings(**worker_settings(data_dir, **overrides))
    migrate.upgrade(settings.database_url)
    ctx = WorkerContext.build(settings)
    ctx.broker.close()
    broker = RecordingBroker(settings)
    ctx.broker = broker  # type: ignore[assignment]
    try:
        with ctx.sessions() as session:
            key, _ = keys.create_key(session=session, name="worker-tests")
        yield WorkerEnv("sqlite", settings, ctx, broker, key)
    finally:
        ctx.engine.dispose()


@pytest.fixture
def embedded(tmp_path: Path, tiny_base: Path) -> Iterator[WorkerEnv]:
    """The embedded mode: the database and the jobs' files on one small disk, the data dir."""
    with small_disk(tmp_path / "data", "32m") as data_dir, worker_env(data_dir, tiny_base) as env:
        yield env


def before_recording(monkeypatch: pytest.MonkeyPatch, step: int, action: Callable[[], object]) -> None:
    """Run `action` once the checkpoint of `step` is written, right before the worker records it (once)."""
    original = training.JobCallbacks.on_checkpoint
    done: list[bool] = []

    def on_checkpoint(self: training.JobCallbacks, path: Path, at: int, metrics: dict[str, Any]) -> None:
        if at == step and not done:
            done.append(True)
            action()
        original(self, path, at, metrics)

    monkeypatch.setattr(training.JobCallbacks, "on_checkpoint", on_checkpoint)


def checkpoints_on_disk(env: WorkerEnv, job_id: str) -> list[str]:
    return [p.name for p in sorted(storage.job_dir(env.settings, job_id).glob("attempt-*/checkpoints/step-*"))]


def resume_and_finish(env: WorkerEnv, job_id: str, resumed_from: int) -> None:
    with env.ctx.sessions() as session:
        jobs.resume_job(session=session, broker=env.broker, key=env.key, job_id=job_id)  # type: ignore[arg-type]
    assert env.job(job_id).error is None
    assert run(env, job_id, attempt=1) == "succeeded"
    assert any(f"Resuming from the checkpoint at step {resumed_from}" in e.message for e in env.events(job_id))


def assert_paused_for_storage(env: WorkerEnv, job_id: str, last_checkpoint: int) -> None:
    job = env.job(job_id)
    assert (job.status, job.lease_owner) == (JobStatus.PAUSED, None)
    assert job.error is not None and job.error["code"] == "storage_full"
    assert f"last checkpoint (step {last_checkpoint})" in job.error["message"]


def test_a_checkpoint_whose_row_cannot_be_written_pauses_the_job_as_its_files_would(
        embedded: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills between the checkpoint's files and its row: the unrecorded files are deleted, which gives the
    pause's write room, and the job resumes from the checkpoint before, to the same adapter."""
    env = embedded
    training_file = env.upload(fact_rows(16, seed=8))
    straight = env.create_job(training_file, n_checkpoints=4)  # 8 steps, a checkpoint every 2
    assert run(env, straight) == "succeeded"

    job_id = env.create_job(training_file, n_checkpoints=4)
    filler: list[Path] = []
    before_recording(monkeypatch, 4, lambda: filler.append(fill_database(sqlite_file(env.settings.database_url))))
    assert run(env, job_id) == "paused"
    monkeypatch.undo()
    assert_paused_for_storage(env, job_id, last_checkpoint=2)
    assert [c.step_number for c in env.checkpoints(job_id)] == [2]
    assert checkpoints_on_disk(env, job_id) == ["step-000002"]  # step 4's, never recorded, is gone

    filler[0].unlink()
    resume_and_finish(env, job_id, resumed_from=2)
    assert_same(final_adapter(env, job_id), final_adapter(env, straight))


def test_a_final_adapter_whose_row_cannot_be_written_pauses_the_job(
        embedded: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills between the final adapter and the job's completion: not succeeded (the row is what serves it)
    nor left to the reaper: paused, the adapter deleted, and a resume finishes from the last checkpoint."""
    env = embedded
    training_file = env.upload(fact_rows(16, seed=8))
    straight = env.create_job(training_file, n_checkpoints=4)
    assert run(env, straight) == "succeeded"

    job_id = env.create_job(training_file, n_checkpoints=4)
    filler: list[Path] = []
    complete = lifecycle.complete_job

    def filling_first(**kwargs: Any) -> str | None:
        if not filler:
            filler.append(fill_database(sqlite_file(env.settings.database_url)))
        return complete(**kwargs)

    monkeypatch.setattr(lifecycle, "complete_job", filling_first)
    assert run(env, job_id) == "paused"
    monkeypatch.undo()
    assert_paused_for_storage(env, job_id, last_checkpoint=8)
    assert env.job(job_id).fine_tuned_model is None
    assert not list(storage.job_dir(env.settings, job_id).glob("attempt-*/final"))

    filler[0].unlink()
    resume_and_finish(env, job_id, resumed_from=8)
    assert_same(final_adapter(env, job_id), final_adapter(env, straight))


def test_when_not_even_the_pause_can_be_written_the_job_is_requeued_once_its_lease_expires(
        tmp_path: Path, tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database on a disk of its own, full: deleting the unrecorded checkpoint frees nothing there, so the
    attempt ends unrecorded (the job still `running`); once its lease has expired and space is back, the reaper
    requeues it and the next attempt resumes from its last recorded checkpoint."""
    database = tmp_path / "db" / "unsloth.db"
    with small_disk(database.parent, "4m"), worker_env(tmp_path / "data", tiny_base,
                                                       database_url=f"sqlite:///{database}") as env:
        job_id = env.create_job(env.upload(fact_rows(16, seed=8)), n_checkpoints=4)
        filler: list[Path] = []
        before_recording(monkeypatch, 4, lambda: filler.append(fill_database(database)))
        assert run(env, job_id) == "unrecorded"
        monkeypatch.undo()
        assert env.job(job_id).status == JobStatus.RUNNING
        assert checkpoints_on_disk(env, job_id) == ["step-000002"]

        filler[0].unlink()
        with env.ctx.sessions() as session:
            expired = utcnow() + timedelta(seconds=env.settings.lease_s + 1)
            assert lifecycle.reap_expired(session=session, settings=env.settings, now=expired) == [(job_id, 1)]
        assert run(env, job_id, attempt=1) == "succeeded"
        assert any("Resuming from the checkpoint at step 2" in e.message for e in env.events(job_id))
