"""At-least-once delivery, and creates that race, never run a job twice nor make two jobs.

- The same `train(job, attempt)` message delivered twice: one run; the second delivery is dropped.
- A job that runs longer than the broker's visibility timeout: Redis hands its unacknowledged message to the other
  worker while the first still runs it; that delivery is dropped and the job runs once.
- Twenty identical job creations at once with one Idempotency-Key: one job, and every answer names it.

The broker here redelivers unacknowledged messages after 4 s (sweeping every second) instead of a day.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from app.core.broker import Broker
from app.core.config import load_settings
from tests.chaos.conftest import Chaos
from tests.e2e.conftest import TINY, all_events, create_job, metric_steps, status_events, upload_facts

VISIBILITY_S = 4
WORKERS = ("worker", "worker-b")


@pytest.fixture(scope="module")
def chaos(chaos_factory: Any) -> Iterator[Chaos]:
    options = {"visibility_timeout": VISIBILITY_S, "unacked_restore_interval": 1, "unacked_restore_throttle": 1}
    with chaos_factory("delivery", workers=WORKERS, broker_options=options) as c:
        yield c


def deliveries_dropped(chaos: Chaos, job_id: str, attempt: int) -> int:
    text = "".join(chaos.log_of(name) for name in WORKERS)
    return len(re.findall(rf"job {job_id} attempt {attempt}: not queued with this attempt", text))


def send_again(chaos: Chaos, job_id: str, attempt: int) -> None:
    """Another delivery of `train(job_id, attempt)`, as a broker redelivery or a re-send would make."""
    settings = load_settings(data_dir=chaos.stack.data_dir, broker_url=chaos.stack.env["UNSLOTH_BROKER_URL"],
                             broker_transport_options=json.loads(chaos.stack.env["UNSLOTH_BROKER_TRANSPORT_OPTIONS"]))
    broker = Broker(settings)
    try:
        broker.send_train(job_id, attempt)
    finally:
        broker.close()


def test_the_same_message_twice_runs_the_job_once(chaos: Chaos) -> None:
    client = chaos.stack.client()
    job_id = create_job(client, upload_facts(client, 8))
    send_again(chaos, job_id, 0)  # while the first delivery is being claimed
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    chaos.stack.wait(lambda: deliveries_dropped(chaos, job_id, 0) >= 1, 60, "a worker to drop the second delivery")
    send_again(chaos, job_id, 0)  # long after: the main process drops it, no pool process is spent on it
    stale = re.compile(rf"INFO/MainProcess\] job {job_id} attempt 0: not queued with this attempt")
    chaos.stack.wait(lambda: stale.search("".join(chaos.log_of(name) for name in WORKERS)), 30,
                     "the main process to drop the stale delivery")
    assert status_events(all_events(client, job_id)) == ["running", "succeeded"]


def test_a_job_longer_than_the_visibility_timeout_runs_once(chaos: Chaos) -> None:
    client = chaos.stack.client()
    steps = 300
    chaos.fault_next_job(step_ms=40)  # 12 s or more, whatever the machine: three visibility timeouts
    job_id = create_job(client, upload_facts(client, steps, seed=2), batch_size=1, n_checkpoints=3)
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    assert deliveries_dropped(chaos, job_id, 0) >= 1  # Redis did redeliver it, mid-run
    events = all_events(client, job_id)
    assert status_events(events) == ["running", "succeeded"]
    assert metric_steps(events) == list(range(1, steps + 1))


def test_twenty_concurrent_creations_with_one_idempotency_key_make_one_job(chaos: Chaos) -> None:
    client = chaos.stack.client()
    body = {"model": TINY, "training_file": upload_facts(client, 8, seed=9), "seed": 3,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}}}
    headers = {"Authorization": f"Bearer {chaos.stack.key}", "Idempotency-Key": "chaos-twenty"}
    before = {j.id for j in client.fine_tuning.jobs.list(limit=100)}
    with httpx.Client(base_url=chaos.stack.base_url, timeout=60, headers=headers) as api, \
            ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: api.post("/v1/fine_tuning/jobs", json=body), range(20)))
        assert [a.status_code for a in answers] == [200] * 20, [a.text for a in answers if a.status_code != 200]
        ids = {a.json()["id"] for a in answers}
        assert len(ids) == 1
        different = api.post("/v1/fine_tuning/jobs", json={**body, "seed": 4})
        assert different.status_code == 422 and different.json()["error"]["code"] == "idempotency_key_reused"
    assert {j.id for j in client.fine_tuning.jobs.list(limit=100)} - before == ids
    (job_id,) = ids
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    assert status_events(all_events(client, job_id)) == ["running", "succeeded"]
    resent = chaos.log_of("housekeeping").count(f"re-sent 1 unclaimed job(s): {job_id}")
    assert chaos.job(job_id)["send_count"] == 1 + resent  # the creation sent one message, the replays none
