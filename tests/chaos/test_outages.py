"""The broker (Redis) and the database (PostgreSQL) go away and come back, under a running service.

- Redis killed and restarted (no persistence: every message is lost) while the workers are idle, and while one job
  runs with another queued behind it: the workers consume again by themselves, the running job finishes, the queued
  one (whose message died with Redis) and one created during the outage are sent again and run once. While Redis is
  down the API's readiness answers 503 with the error envelope; everything else keeps answering.
- PostgreSQL restarted mid-job, briefly (well within a lease: the job carries on, nothing is requeued) and for longer
  than a lease (the worker fences itself, the reaper requeues, the job resumes from its last checkpoint): every
  endpoint that needs the database answers 503 with the error envelope while it is down, and recovers by itself; a
  client following the job's events as a stream stays connected and gets every event through to the end.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.chaos.conftest import Chaos
from tests.e2e.conftest import (
    TINY,
    all_events,
    create_job,
    jsonl,
    metric_steps,
    status_events,
    trained_steps,
    upload_facts,
)

LONG_STEPS = 200
LONG: dict[str, Any] = {"batch_size": 1, "n_checkpoints": 10}  # 200 examples: 200 steps, a checkpoint every 20
STEP_MS = 40  # each step of a long job takes at least this long: 8 s or more, on a machine of any speed


@pytest.fixture(scope="module")
def chaos(chaos_factory: Any) -> Iterator[Chaos]:
    with chaos_factory("outage") as c:
        yield c


@pytest.fixture(scope="module")
def long_file(chaos: Chaos) -> str:
    return upload_facts(chaos.stack.client(), LONG_STEPS, seed=3)


@pytest.fixture(scope="module")
def short_file(chaos: Chaos) -> str:
    return upload_facts(chaos.stack.client(), 8, seed=4)


def http(chaos: Chaos) -> httpx.Client:
    return httpx.Client(base_url=chaos.stack.base_url, timeout=30,
                        headers={"Authorization": f"Bearer {chaos.stack.key}"})


def assert_unavailable(response: httpx.Response, code: str) -> None:
    """503, with the error envelope and a hint to retry."""
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "service_unavailable"
    assert error["code"] == code and error["message"]


def probe(api: httpx.Client, job_id: str, file_id: str, *, generate: bool = True) -> dict[str, httpx.Response]:
    """One request to each kind of endpoint (none that changes a job)."""
    job = f"/v1/fine_tuning/jobs/{job_id}"
    body = {"model": TINY, "training_file": file_id,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}}}
    answers = {
        "retrieve job": api.get(job), "list jobs": api.get("/v1/fine_tuning/jobs"),
        "events": api.get(f"{job}/events"), "checkpoints": api.get(f"{job}/checkpoints"),
        "create job": api.post("/v1/fine_tuning/jobs", json=body),
        "list files": api.get("/v1/files"), "retrieve file": api.get(f"/v1/files/{file_id}"),
        "upload": api.post("/v1/files", data={"purpose": "fine-tune"},
                           files={"file": ("f.jsonl", jsonl([{"prompt": "a", "completion": "b"}]))}),
        "models": api.get("/v1/models"), "model": api.get(f"/v1/models/{TINY}"),
    }
    if generate:
        answers["chat"] = api.post("/v1/chat/completions", json={"model": TINY, "max_tokens": 2,
                                                                 "messages": [{"role": "user", "content": "Hi"}]})
    return answers


def unready(api: httpx.Client) -> httpx.Response:
    """/ready once it says not ready: its answer may be UNSLOTH_PROBE_CACHE_S (2 s) old."""
    deadline = time.monotonic() + 15
    while (ready := api.get("/ready")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    return ready


def assert_database_unavailable(api: httpx.Client, job_id: str, file_id: str) -> None:
    for what, response in probe(api, job_id, file_id).items():
        assert response.status_code == 503, (what, response.status_code, response.text)
        assert_unavailable(response, "database_unavailable")
    assert_unavailable(unready(api), "not_ready")
    assert api.get("/health").status_code == 200 and api.get("/metrics").status_code == 200


class EventStream(threading.Thread):
    """A client following a job's events (`?stream=true`) until `[DONE]`, in the background."""

    def __init__(self, chaos: Chaos, job_id: str) -> None:
        super().__init__(name=f"events-{job_id}", daemon=True)
        self.chaos, self.job_id = chaos, job_id
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with http(self.chaos) as api, api.stream("GET", f"/v1/fine_tuning/jobs/{self.job_id}/events",
                                                     params={"stream": "true"},
                                                     timeout=httpx.Timeout(10, read=60)) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                        return
                    if line.startswith("data: "):
                        self.events.append(json.loads(line.removeprefix("data: ")))
        except BaseException as e:
            self.error = e

    def statuses(self) -> list[str]:
        return [e["data"]["status"] for e in self.events if e.get("data") and "status" in e["data"]]


def create_long_job(chaos: Chaos, file_id: str) -> str:
    chaos.fault_next_job(step_ms=STEP_MS)
    job_id = create_job(chaos.stack.client(), file_id, **LONG)
    assert chaos.stack.wait(lambda: chaos.faulty(job_id) if (chaos.faults / f"{job_id}.json").exists() else None,
                            60, "the long job to start")["step_ms"] == STEP_MS
    return job_id


def succeeded_once(chaos: Chaos, job_id: str, transitions: list[str] | None = None) -> list[Any]:
    assert chaos.stack.wait_status(job_id, ("succeeded", "failed"), timeout=120).status == "succeeded"
    events = all_events(chaos.stack.client(), job_id)
    assert status_events(events) == (transitions or ["running", "succeeded"])
    return events


# ---- Redis ----


def test_redis_restart_while_idle(chaos: Chaos, short_file: str) -> None:
    with http(chaos) as api:
        assert api.get("/ready").status_code == 200
        chaos.redis.stop()
        ready = unready(api)
        assert_unavailable(ready, "not_ready")
        assert "broker" in ready.json()["error"]["message"]
        for what, response in probe(api, "ftjob-none", short_file, generate=False).items():
            assert response.status_code < 500, (what, response.status_code, response.text)  # only the DB needed
        assert api.get("/metrics").status_code == 200
        started = time.monotonic()
        during = create_job(chaos.stack.client(), short_file)  # kept in the database; sent once Redis is back
        assert time.monotonic() - started < 10
        time.sleep(2)
        chaos.redis.start()
        chaos.stack.wait(lambda: api.get("/ready").status_code == 200, 30, "the API to be ready again")
    after = create_job(chaos.stack.client(), short_file)
    succeeded_once(chaos, after)
    succeeded_once(chaos, during)


def test_redis_restart_with_a_job_running_and_one_queued(chaos: Chaos, long_file: str, short_file: str) -> None:
    client = chaos.stack.client()
    running = create_long_job(chaos, long_file)
    trained_steps(chaos.stack, running, 5)
    queued = create_job(client, short_file)  # its message waits in Redis behind the running job
    assert chaos.job(queued)["enqueued_at"] is not None
    chaos.redis.stop()  # ... and dies with it
    with http(chaos) as api:
        assert_unavailable(unready(api), "not_ready")
    time.sleep(2)
    chaos.redis.start()
    assert chaos.job(running)["status"] == "running"
    events = succeeded_once(chaos, running)
    assert metric_steps(events) == list(range(1, LONG_STEPS + 1))  # never interrupted
    succeeded_once(chaos, queued)
    assert chaos.job(queued)["send_count"] >= 2  # sent again by the housekeeping worker


# ---- PostgreSQL ----


def test_postgres_restart_within_a_lease(chaos: Chaos, long_file: str) -> None:
    job_id = create_long_job(chaos, long_file)
    trained_steps(chaos.stack, job_id, 5)
    chaos.pg.stop()
    with http(chaos) as api:
        assert_database_unavailable(api, job_id, long_file)
        chaos.pg.start()
        chaos.stack.wait(lambda: api.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200, 30,
                         "the API to answer again")
    assert chaos.job(job_id)["attempt"] == 0
    succeeded_once(chaos, job_id)  # the same attempt: the reaper did not take a slow job for a dead one


def test_postgres_down_for_longer_than_a_lease(chaos: Chaos, long_file: str) -> None:
    client = chaos.stack.client()
    job_id = create_long_job(chaos, long_file)
    chaos.stack.wait(lambda: list(client.fine_tuning.jobs.checkpoints.list(job_id)), 60, "a first checkpoint")
    stream = EventStream(chaos, job_id)
    chaos.stack.wait(lambda: stream.events, 30, "the event stream to start")
    lease = float(chaos.stack.env["UNSLOTH_LEASE_S"])
    chaos.pg.stop()
    down = time.monotonic()
    with http(chaos) as api:
        while time.monotonic() - down < lease * 2:
            assert_database_unavailable(api, job_id, long_file)
            time.sleep(0.5)
        chaos.pg.start()
        chaos.stack.wait(lambda: api.get(f"/v1/fine_tuning/jobs/{job_id}").status_code == 200, 30,
                         "the API to answer again")
    step = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id))
    events = succeeded_once(chaos, job_id, ["running", "queued", "running", "succeeded"])
    assert f"Resuming from the checkpoint at step {step}" in [e.message for e in events]
    assert "the lease ran out while the database was unreachable" in chaos.log_of("worker")
    stream.join(timeout=30)
    assert stream.error is None and stream.done, stream.error
    assert [e["id"] for e in stream.events] == [e.id for e in events]  # every event, in order, once
