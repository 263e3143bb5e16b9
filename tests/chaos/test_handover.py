"""A job moves from one training worker to another: the first is stopped with SIGTERM mid-training (it checkpoints,
requeues the job and exits within its grace time; the other worker finishes the job without training a step twice),
or frozen with SIGSTOP past its lease (the reaper gives the job to the other worker; when the frozen one is resumed
with SIGCONT, every write it tries is fenced off: it changes nothing, and the job succeeds once)."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.chaos.conftest import Chaos, freeze, thaw
from tests.e2e.conftest import all_events, create_job, metric_steps, status_events, trained_steps, upload_facts

WORKERS = ("worker", "worker-b")
STEPS = 200
HP: dict[str, Any] = {"batch_size": 1, "n_checkpoints": 20}  # 200 steps, a checkpoint every 10
STEP_MS = 30  # each step takes at least this long (a fault hook): 6 s or more, however fast the machine trains


@pytest.fixture(scope="module")
def chaos(chaos_factory: Any) -> Iterator[Chaos]:
    with chaos_factory("handover", workers=WORKERS) as c:
        yield c


@pytest.fixture(scope="module")
def training_file(chaos: Chaos) -> str:
    return upload_facts(chaos.stack.client(), STEPS, seed=6)


@pytest.fixture(autouse=True)
def both_workers(chaos: Chaos) -> None:
    """Each test starts with both workers up (the one a test stopped is started again)."""
    for name in WORKERS:
        if not chaos.stack.procs[name].alive():
            chaos.start_worker(name)
            chaos.wait_warm(name)


def other(name: str) -> str:
    return next(n for n in WORKERS if n != name)


def name_of(chaos: Chaos, pid: int) -> str:
    return next(n for n in WORKERS if chaos.stack.procs[n].pid == pid)


def resumed_from(events: list[Any]) -> int:
    """The step the second run resumed from (its event says so)."""
    (step,) = [int(m.group(1)) for e in events if (m := re.fullmatch(r"Resuming from the checkpoint at step (\d+)",
                                                                       e.message))]
    return step


def test_sigterm_checkpoints_requeues_and_another_worker_finishes(chaos: Chaos, training_file: str) -> None:
    client = chaos.stack.client()
    chaos.fault_next_job(step_ms=STEP_MS)
    job_id = create_job(client, training_file, **HP)
    trained_steps(chaos.stack, job_id, 3)
    first = name_of(chaos, chaos.holder(job_id)[0])
    worker = chaos.stack.procs[first]
    started = time.monotonic()
    worker.popen.send_signal(signal.SIGTERM)
    grace = float(chaos.stack.env["UNSLOTH_SHUTDOWN_GRACE_S"])
    try:
        worker.popen.wait(timeout=grace + 5)
    except Exception:
        pytest.fail(f"the worker did not exit within its grace time\n{chaos.stack.logs()}")
    assert time.monotonic() - started < grace
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    events = all_events(client, job_id)
    assert status_events(events) == ["running", "queued", "running", "succeeded"]
    step = resumed_from(events)
    assert f"The worker is shutting down; checkpoint saved at step {step}; requeued as attempt 1" in \
        [e.message for e in events]
    assert f"Checkpoint saved at step {step}" in [e.message for e in events]
    # The preemption's checkpoint is one beyond the job's n_checkpoints evenly spaced ones: pruned once they are in.
    assert sorted(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id)) == \
        list(range(10, STEPS + 1, 10))
    assert metric_steps(events) == list(range(1, STEPS + 1))  # stopped at its checkpoint: nothing trained twice
    # The worker logs the outcome after the job's final write (and after freeing its memory): wait for the line.
    chaos.stack.wait(lambda: f"job {job_id} attempt 1: succeeded" in chaos.log_of(other(first)), 30,
                     "the other worker to log the attempt it finished")


def test_a_frozen_worker_resumed_after_its_job_moved_changes_nothing(chaos: Chaos, training_file: str) -> None:
    client = chaos.stack.client()
    chaos.fault_next_job(step_ms=STEP_MS)
    job_id = create_job(client, training_file, **HP)
    chaos.stack.wait(lambda: list(client.fine_tuning.jobs.checkpoints.list(job_id)), 60, "a first checkpoint")
    main, _ = chaos.holder(job_id)
    frozen = name_of(chaos, main)
    freeze(main)  # the whole worker: main process and pool process
    try:
        chaos.wait_attempt(job_id, 1, timeout=30)  # the lease expired, the reaper requeued, the other claimed
        assert chaos.holder(job_id)[0] == chaos.stack.procs[other(frozen)].pid
    finally:
        thaw(main)
    chaos.stack.wait(lambda: f"job {job_id} attempt 0: lease lost" in chaos.log_of(frozen), 30,
                     "the resumed worker to find its lease gone")
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    events = all_events(client, job_id)
    assert status_events(events) == ["running", "queued", "running", "succeeded"]
    resumed = [i for i, e in enumerate(events) if e.data and e.data.get("status") == "running"][1]
    # After the second worker's claim, every metric is its own: one run from the checkpoint to the end.
    assert metric_steps(events[resumed:]) == list(range(resumed_from(events) + 1, STEPS + 1))
    # The worker logs the outcome after the job's final write (and after freeing its memory): wait for the line.
    chaos.stack.wait(lambda: f"job {job_id} attempt 1: succeeded" in chaos.log_of(other(frozen)), 30,
                     "the other worker to log the attempt it finished")
    job = chaos.job(job_id)
    assert job["attempt"] == 1 and job["fine_tuned_model"] and job["lease_owner"] is None
