"""A training worker that dies: kill -9 of its pool process mid-step, a crash while a checkpoint is being written, a
job that kills its worker on every attempt, and kill -9 of the worker's main process.

The dead attempt's lease expires, the reaper requeues the job as the next attempt, and a worker resumes it from the
last checkpoint the database recorded, ending with the same adapter, bit for bit, as a run that was never
interrupted. A job that kills its worker every time fails after the restart cap, without a requeue storm.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import redis
import torch
from safetensors.torch import load_file

from tests.chaos.conftest import Chaos
from tests.e2e.conftest import TINY, all_events, create_job, jsonl, metric_steps, status_events, upload_facts

STEPS = 100  # 100 examples, batch 1: 100 steps, a checkpoint every 10
STEP_MS = 30  # a job the test kills mid-way takes at least 3 s (a fault hook that only sleeps), on any machine
HP: dict[str, Any] = {"batch_size": 1, "n_checkpoints": 10}
RESTARTS = 2  # crash recoveries before a job fails


@pytest.fixture(scope="module")
def chaos(chaos_factory: Any) -> Iterator[Chaos]:
    with chaos_factory("crash", UNSLOTH_MAX_JOB_RESTARTS=str(RESTARTS)) as c:
        yield c


@pytest.fixture(scope="module")
def training_file(chaos: Chaos) -> str:
    return upload_facts(chaos.stack.client(), STEPS, seed=5)


@pytest.fixture(scope="module")
def reference(chaos: Chaos, training_file: str) -> dict[str, torch.Tensor]:
    """The adapter of an uninterrupted run of the same job."""
    job_id = create_job(chaos.stack.client(), training_file, **HP)
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    return final_adapter(chaos, job_id)


def final_adapter(chaos: Chaos, job_id: str) -> dict[str, torch.Tensor]:
    finals = sorted((chaos.stack.data_dir / "jobs" / job_id).glob("attempt-*/final/adapter_model.safetensors"))
    assert len(finals) == 1, finals
    return load_file(str(finals[0]))


def assert_same(reference: dict[str, torch.Tensor], resumed: dict[str, torch.Tensor]) -> None:
    assert reference.keys() == resumed.keys()
    for k, v in reference.items():
        assert torch.equal(v, resumed[k]), k  # bit for bit, as if it had never been interrupted


def checkpoints(chaos: Chaos, job_id: str) -> list[int]:
    return sorted(c.step_number for c in chaos.stack.client().fine_tuning.jobs.checkpoints.list(job_id))


def wait_past_a_checkpoint(chaos: Chaos, job_id: str) -> None:
    """Until the job has a checkpoint and is a few steps past it."""
    chaos.stack.wait(lambda: checkpoints(chaos, job_id), 60, f"a checkpoint of job {job_id}")
    chaos.stack.wait(lambda: int((chaos.job(job_id)["progress"] or {}).get("step", 0)) >= 13, 60,
                     f"job {job_id} to pass step 13")


def assert_resumed_once(chaos: Chaos, job_id: str, at_least: int) -> None:
    """One crash, one requeue, one success; the second run resumed from the last checkpoint recorded (`at_least`,
    as read just after the crash: a commit in flight may have landed since) and trained from there to the end."""
    events = all_events(chaos.stack.client(), job_id)
    assert status_events(events) == ["running", "queued", "running", "succeeded"]
    (step,) = [int(m.group(1)) for e in events
               if (m := re.fullmatch(r"Resuming from the checkpoint at step (\d+)", e.message))]
    assert step in (at_least, at_least + 10)
    assert metric_steps(events)[-(STEPS - step):] == list(range(step + 1, STEPS + 1))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_9_of_the_pool_process_mid_step(chaos: Chaos, training_file: str,
                                             reference: dict[str, torch.Tensor]) -> None:
    """The main process lives on, acknowledges the message (no broker redelivery) and forks a new pool process,
    which takes the job once the reaper has requeued it."""
    chaos.fault_next_job(step_ms=STEP_MS)
    job_id = create_job(chaos.stack.client(), training_file, **HP)
    wait_past_a_checkpoint(chaos, job_id)
    main, child = chaos.holder(job_id)
    os.kill(child, signal.SIGKILL)
    step = checkpoints(chaos, job_id)[-1]  # the last one recorded before the kill
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    assert_resumed_once(chaos, job_id, step)
    assert not gone(main) and "WorkerLostError" in chaos.log_of("worker")
    assert_same(reference, final_adapter(chaos, job_id))


def test_crash_while_a_checkpoint_is_written(chaos: Chaos, training_file: str,
                                             reference: dict[str, torch.Tensor]) -> None:
    """The process dies after the checkpoint's files are in place, before its manifest: the torn directory is never
    recorded, the next attempt resumes from the checkpoint before it and deletes it."""
    chaos.fault_next_job(tear_checkpoint=20)
    job_id = create_job(chaos.stack.client(), training_file, **HP)
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    assert chaos.faulty(job_id) == {"tear_checkpoint": 20}
    torn = chaos.faults / f"{job_id}.torn"
    assert torn.read_text().endswith("/attempt-0/checkpoints/step-000020")  # it did die there
    events = all_events(chaos.stack.client(), job_id)
    assert "Resuming from the checkpoint at step 10" in [e.message for e in events]  # the one before the torn one
    assert_resumed_once(chaos, job_id, 10)
    assert not os.path.exists(torn.read_text())  # removed by the attempt that resumed
    assert "torn by a crash of attempt 0" in chaos.log_of("worker")
    assert checkpoints(chaos, job_id) == list(range(10, STEPS + 1, 10))
    assert_same(reference, final_adapter(chaos, job_id))


def test_a_job_that_kills_its_worker_every_time_fails_after_the_cap(chaos: Chaos, training_file: str) -> None:
    """Like an out-of-memory kill on every attempt: requeued `RESTARTS` times, then failed with a code a user can
    act on; the broker does not redeliver it and nothing sends it again."""
    client = chaos.stack.client()
    chaos.fault_next_job(exit_at_step=3)
    job_id = create_job(client, training_file, **HP)
    job = chaos.stack.wait_status(job_id, ("succeeded", "failed"), timeout=120)
    assert chaos.faulty(job_id) == {"exit_at_step": 3}
    assert job.status == "failed" and job.error is not None and job.error.code == "worker_lost"
    transitions = ["running", "queued"] * RESTARTS + ["running", "failed"]
    assert status_events(all_events(client, job_id)) == transitions
    deliveries = re.compile(rf"job {job_id} attempt \d+: ")
    delivered = len(deliveries.findall(chaos.log_of("worker")))
    time.sleep(3)  # a requeue storm would show here: more deliveries, more runs
    assert len(deliveries.findall(chaos.log_of("worker"))) == delivered
    assert chaos.log_of("worker").count(f"job {job_id} attempt") <= 2 * (RESTARTS + 1)
    assert status_events(all_events(client, job_id)) == transitions
    assert redis.Redis.from_url(chaos.redis.url).llen("gpu") == 0


def test_kill_9_of_the_main_process(chaos: Chaos, training_file: str, reference: dict[str, torch.Tensor]) -> None:
    """Its pool process dies with it (no orphan keeps training, or holding the GPU); the job waits, requeued, for
    the next worker, which resumes it."""
    chaos.fault_next_job(step_ms=STEP_MS)
    job_id = create_job(chaos.stack.client(), training_file, **HP)
    wait_past_a_checkpoint(chaos, job_id)
    worker = chaos.worker_holding(job_id)
    main, child = chaos.holder(job_id)
    os.kill(main, signal.SIGKILL)
    worker.popen.wait()
    chaos.stack.wait(lambda: gone(child), 10, "the orphaned pool process to die")
    step = checkpoints(chaos, job_id)[-1]
    chaos.wait_attempt(job_id, 1, status="queued", timeout=30)  # the reaper, once the lease expired
    chaos.start_worker("worker")
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    assert_resumed_once(chaos, job_id, step)
    assert_same(reference, final_adapter(chaos, job_id))


RL_STEPS = 20  # 20 prompts, one per step, a checkpoint every 2
RL_HP: dict[str, Any] = {"n_epochs": 1, "batch_size": 1, "n_checkpoints": 10, "num_generations": 2,
                         "max_completion_length": 4, "learning_rate": 5e-3, "lora_r": 4, "max_seq_length": 96}
ANY_A = {"type": "string_check", "name": "has_a", "input": "{{sample.output_text}}", "reference": "{{item.want}}",
         "operation": "like"}


def create_rl_job(chaos: Chaos) -> str:
    client = chaos.stack.client()
    rows = [{"messages": [{"role": "user", "content": f"Say something about {i}."}], "want": "a"}
            for i in range(RL_STEPS)]
    training = client.files.create(file=("rl.jsonl", jsonl(rows)), purpose="fine-tune").id
    method: Any = {"type": "reinforcement", "reinforcement": {"grader": ANY_A, "hyperparameters": RL_HP}}
    return str(client.fine_tuning.jobs.create(model=TINY, training_file=training, seed=7, method=method).id)


def test_kill_9_mid_reinforcement_job(chaos: Chaos) -> None:
    """A GRPO job resumes as an SFT one does: sampling is seeded per (seed, step, completion), so the attempt after
    the crash samples, scores and trains exactly what the dead one would have."""
    straight = create_rl_job(chaos)
    assert chaos.stack.wait_status(straight, ("succeeded", "failed")).status == "succeeded"
    chaos.fault_next_job(step_ms=STEP_MS * 5)
    job_id = create_rl_job(chaos)
    chaos.stack.wait(lambda: checkpoints(chaos, job_id), 60, f"a checkpoint of job {job_id}")
    chaos.stack.wait(lambda: int((chaos.job(job_id)["progress"] or {}).get("step", 0)) >= 5, 60,
                     f"job {job_id} to pass step 5")
    _, child = chaos.holder(job_id)
    os.kill(child, signal.SIGKILL)
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    events = all_events(chaos.stack.client(), job_id)
    assert status_events(events) == ["running", "queued", "running", "succeeded"]
    assert any(e.message.startswith("Resuming from the checkpoint at step") for e in events)
    assert_same(final_adapter(chaos, straight), final_adapter(chaos, job_id))


def test_kill_9_mid_eval_run(chaos: Chaos) -> None:
    """An eval run's worker dies mid-run: the reaper requeues the run, the next attempt grades only the items not
    recorded yet, and every item ends with exactly one output item."""
    import psycopg

    client = chaos.stack.client()
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    nonempty = {"type": "string_check", "name": "said", "input": "{{sample.output_text}}", "reference": "",
                "operation": "ne"}
    evaluation = client.evals.create(name="crash", data_source_config={"type": "custom", "item_schema": schema},
                                     testing_criteria=[nonempty])  # type: ignore[list-item]
    n = 400
    source = {"type": "file_content", "content": [{"item": {"q": f"Question number {i}?"}} for i in range(n)]}
    run = client.evals.runs.create(evaluation.id, data_source={  # type: ignore[arg-type]
        "type": "completions", "model": TINY, "source": source, "sampling_params": {"max_completion_tokens": 48},
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]}})

    def graded() -> int:
        return len(list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=100)))

    def lease_owner() -> str | None:
        with psycopg.connect(chaos.db_url, connect_timeout=5) as conn:
            row = conn.execute("SELECT lease_owner, status FROM eval_runs WHERE id = %s", (run.id,)).fetchone()
        return row[0] if row and row[1] == "in_progress" and row[0] else None

    chaos.stack.wait(lambda: graded() > 0, 120, f"run {run.id} to grade its first items")
    owner = lease_owner()
    assert owner is not None, "the run finished before it could be interrupted: give it more items"
    os.kill(int(owner.split("/")[2]), signal.SIGKILL)
    done = chaos.stack.wait(lambda: (r := client.evals.runs.retrieve(run.id, eval_id=evaluation.id)).status in (
        "completed", "failed") and r, 300, f"run {run.id} to finish")
    assert done.status == "completed", done.error
    assert done.result_counts.total == n and done.result_counts.errored == 0
    items = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, limit=100))
    assert len(items) == n and len({i.datasource_item_id for i in items}) == n  # each item graded once
    with psycopg.connect(chaos.db_url, connect_timeout=5) as conn:
        (attempt,) = conn.execute("SELECT attempt FROM eval_runs WHERE id = %s", (run.id,)).fetchone() or (0,)
    assert attempt >= 1  # it did resume in a new attempt
