"""A worker that dies or is stopped in the middle of training, on PostgreSQL + Redis: kill -9 (the lease expires,
the reaper requeues, a new worker resumes from the last recorded checkpoint and ends with the same adapter as an
uninterrupted run), and SIGTERM (checkpoint, requeue, exit within the grace time)."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.commands import WORKER
from tests.e2e.conftest import (
    Stack,
    all_events,
    create_job,
    metric_steps,
    status_events,
    trained_steps,
    upload_facts,
)

STEPS: dict[str, Any] = {"batch_size": 1, "n_checkpoints": 10}  # 100 examples: 100 steps, a checkpoint every 10


def final_adapter(stack: Stack, job_id: str) -> dict[str, torch.Tensor]:
    finals = sorted((stack.data_dir / "jobs" / job_id).glob("attempt-*/final/adapter_model.safetensors"))
    assert len(finals) == 1, finals
    return load_file(str(finals[0]))


def test_kill_9_mid_training_resumes_from_the_last_checkpoint(pg_stack: Stack) -> None:
    client = pg_stack.client()
    training_file = upload_facts(client, 100, seed=5)
    reference = create_job(client, training_file, **STEPS)
    assert pg_stack.wait_status(reference, ("succeeded", "failed")).status == "succeeded"
    job_id = create_job(client, training_file, **STEPS)
    pg_stack.wait(lambda: list(client.fine_tuning.jobs.checkpoints.list(job_id)), 60, "a first checkpoint")
    pg_stack.procs["worker"].kill()  # the whole worker, pool process included, without a chance to clean up
    assert client.fine_tuning.jobs.retrieve(job_id).status in ("running", "queued")  # until its lease expires
    last = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id))
    pg_stack.start("worker", WORKER)
    assert pg_stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    events = all_events(client, job_id)
    assert status_events(events) == ["running", "queued", "running", "succeeded"]  # one terminal transition
    assert any(e.message == f"Resuming from the checkpoint at step {last}" for e in events)
    assert metric_steps(events)[-(100 - last):] == list(range(last + 1, 101))
    reference_adapter, resumed = final_adapter(pg_stack, reference), final_adapter(pg_stack, job_id)
    assert reference_adapter.keys() == resumed.keys()
    for k, v in reference_adapter.items():
        assert torch.equal(v, resumed[k]), k  # bit for bit, as if it had never been interrupted


def test_sigterm_checkpoints_requeues_and_exits_within_the_grace(pg_stack: Stack) -> None:
    client = pg_stack.client()
    job_id = create_job(client, upload_facts(client, 100, seed=6), **STEPS)
    trained_steps(pg_stack, job_id, 3)
    worker = pg_stack.procs["worker"]
    started = time.monotonic()
    worker.popen.send_signal(signal.SIGTERM)
    grace = float(pg_stack.env["UNSLOTH_SHUTDOWN_GRACE_S"])
    try:
        worker.popen.wait(timeout=grace + 5)
    except Exception:
        pytest.fail(f"the worker did not exit within its grace time\n{pg_stack.logs()}")
    assert time.monotonic() - started < grace
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "queued", job
    step = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id))
    assert any(e.message.startswith(f"The worker is shutting down; checkpoint saved at step {step}")
               for e in all_events(client, job_id))
    pg_stack.start("worker", WORKER)
    assert pg_stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    events = all_events(client, job_id)
    assert metric_steps(events) == list(range(1, 101))  # stopped at its checkpoint: nothing trained twice
    assert status_events(events) == ["running", "queued", "running", "succeeded"]
