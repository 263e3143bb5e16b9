"""The disk fills up under a real training worker (issue 15). The jobs directory is a small tmpfs of its own; once a
job has recorded a checkpoint, a filler file takes all but a few KB of it, so the next checkpoint cannot be written.
The job stops cleanly: paused, its error `storage_full`, no torn checkpoint recorded, served or left on disk. Space is
freed, the job is resumed over the API, and it succeeds from its last good checkpoint, to the same adapter, bit for
bit, as a run that never stopped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.conftest import Chaos
from tests.chaos.test_worker_crash import assert_same, checkpoints, final_adapter
from tests.e2e.conftest import all_events, create_job, status_events, upload_facts
from tests.small_disk import fill, small_disk
from unsloth_core.checkpoint import is_complete

STEPS = 40  # 40 examples, batch 1: 40 steps, a checkpoint every 10
HP: dict[str, Any] = {"batch_size": 1, "n_checkpoints": 4}
STEP_MS = 100  # the filler has a second between two checkpoints to take the room, however fast the machine trains


@pytest.fixture(scope="module")
def chaos(chaos_factory: Any) -> Iterator[Chaos]:
    with chaos_factory("disk") as c, small_disk(c.stack.data_dir / "jobs", "16m"):
        yield c


def test_a_job_that_fills_the_disk_pauses_then_resumes_from_its_last_good_checkpoint(chaos: Chaos) -> None:
    client = chaos.stack.client()
    training_file = upload_facts(client, STEPS, seed=9)
    straight = create_job(client, training_file, **HP)
    assert chaos.stack.wait_status(straight, ("succeeded", "failed")).status == "succeeded"

    jobs_dir = chaos.stack.data_dir / "jobs"
    chaos.fault_next_job(step_ms=STEP_MS)
    job_id = create_job(client, training_file, **HP)
    chaos.stack.wait(lambda: checkpoints(chaos, job_id), 60, f"a checkpoint of job {job_id}")
    filler = fill(jobs_dir, leave=8192)
    job = chaos.stack.wait_status(job_id, ("paused", "succeeded", "failed"), timeout=60)
    assert job.status == "paused" and job.error is not None and job.error.code == "storage_full", job
    last = max(checkpoints(chaos, job_id))
    assert f"continues from its last checkpoint (step {last})" in job.error.message
    on_disk = sorted((jobs_dir / job_id).glob("attempt-*/checkpoints/*"))
    assert [p.name for p in on_disk] == [f"step-{s:06d}" for s in checkpoints(chaos, job_id)]  # no temporaries
    assert all(is_complete(p) for p in on_disk)  # nothing torn recorded, nothing torn left
    paused = [e for e in all_events(client, job_id) if (e.data or {}).get("status") == "paused"]
    assert len(paused) == 1 and paused[0].level == "error" and "storage is full" in paused[0].message

    filler.unlink()
    client.fine_tuning.jobs.resume(job_id)
    job = chaos.stack.wait_status(job_id, ("succeeded", "failed", "paused"), timeout=60)
    assert job.status == "succeeded" and job.error is None, job
    events = all_events(client, job_id)
    assert f"Resuming from the checkpoint at step {last}" in [e.message for e in events]
    assert status_events(events) == ["running", "paused", "queued", "running", "succeeded"]
    assert_same(final_adapter(chaos, straight), final_adapter(chaos, job_id))
