"""A full disk (issue 15), on a small tmpfs of its own: an atomic write that hits ENOSPC leaves nothing behind, and a
job whose checkpoint cannot be written pauses (error `storage_full`) with no torn checkpoint recorded, then, once
space is back, resumes from its last good checkpoint to the same adapter as a run that never stopped."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from app.db.models import JobStatus
from app.services import jobs, storage
from tests.small_disk import fill, small_disk
from tests.worker.conftest import WorkerEnv, fact_rows
from tests.worker.test_training import assert_same, at_step, final_adapter, metric_steps, run
from unsloth_core.checkpoint import atomic_directory, is_complete


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
