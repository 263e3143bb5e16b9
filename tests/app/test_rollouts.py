"""A reinforcement job's rollouts: written by the worker through `lifecycle.record_rollouts` (fenced, capped), read
back over `GET /v1/fine_tuning/jobs/{id}/rollouts` (newest first, paged, by step, owned)."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import func, select

from app.db.models import JobRollout
from app.services import lifecycle, rollouts
from tests.app.conftest import TINY, Backend, chat_rows, jsonl, upload


def claimed_job(backend: Backend, key: str, owner: str = "w1") -> str:
    """A job made over the API and claimed as a worker would (attempt 0, leased to `owner`)."""
    client = backend.client(key)
    job = client.fine_tuning.jobs.create(model=TINY, training_file=upload(client, jsonl(chat_rows(12))).id)
    with backend.ctx.sessions() as session:
        assert lifecycle.claim_job(session=session, job_id=job.id, attempt=0, owner=owner) is not None
    return job.id


def sample(prompt: Any, *texts: str) -> dict[str, Any]:
    """One prompt's rollout as the engine's GRPO hands it over."""
    completions = [{"text": t, "reward": float(i), "rewards": {"exact": float(i)}, "advantage": i - 0.5,
                    "finish_reason": "stop", "num_tokens": len(t)} for i, t in enumerate(texts)]
    return {"prompt": prompt, "completions": completions}


def record(backend: Backend, job_id: str, step: int, samples: list[dict[str, Any]], *, attempt: int = 0,
           owner: str = "w1") -> None:
    with backend.ctx.sessions() as session:
        lifecycle.record_rollouts(session=session, job_id=job_id, attempt=attempt, owner=owner, step=step,
                                  samples=samples)


def get_rollouts(backend: Backend, key: str, job_id: str, **params: Any) -> dict[str, Any]:
    response = backend.client(key).get(f"/fine_tuning/jobs/{job_id}/rollouts", options={"params": params},
                                       cast_to=httpx.Response)
    body: dict[str, Any] = response.json()
    return body


def stored(backend: Backend, job_id: str) -> int:
    with backend.ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(JobRollout).where(JobRollout.job_id == job_id)) or 0


def test_rollouts_newest_first_paged_and_by_step(backend: Backend) -> None:
    key = backend.new_key("rollouts")
    job_id = claimed_job(backend, key)
    chat = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}]
    graded = sample("2 + 2 =", "4", "5")
    graded["completions"][0]["grader"] = {"sub_scores": {"a": 1.0}, "errors": {"python_grader_runtime_error": 0}}
    record(backend, job_id, 1, [sample(chat, "Paris", "Lyon"), graded])
    record(backend, job_id, 2, [sample(chat, "Paris", "Paris"), sample("2 + 2 =", "4", "4")])

    body = get_rollouts(backend, key, job_id)
    assert (body["object"], body["has_more"]) == ("list", False)
    data = body["data"]
    assert [(r["step"], r["prompt"]) for r in data] == [(2, "2 + 2 ="), (2, chat), (1, "2 + 2 ="), (1, chat)]
    assert (body["first_id"], body["last_id"]) == (data[0]["id"], data[-1]["id"])
    assert all(r["object"] == "fine_tuning.job.rollout" and r["id"].startswith("ftrollout-")
               and isinstance(r["created_at"], int) for r in data)
    assert data[2]["completions"] == graded["completions"]  # as the engine reported it, the grader's detail too
    assert data[3]["completions"][1] == {"text": "Lyon", "reward": 1.0, "rewards": {"exact": 1.0},
                                         "advantage": 0.5, "finish_reason": "stop", "num_tokens": 4}

    first = get_rollouts(backend, key, job_id, limit=3)
    assert [r["id"] for r in first["data"]] == [r["id"] for r in data[:3]] and first["has_more"] is True
    rest = get_rollouts(backend, key, job_id, limit=3, after=first["last_id"])
    assert [r["id"] for r in rest["data"]] == [data[3]["id"]] and rest["has_more"] is False

    step1 = get_rollouts(backend, key, job_id, step=1)["data"]
    assert [r["id"] for r in step1] == [r["id"] for r in data[2:]]
    assert get_rollouts(backend, key, job_id, step=7)["data"] == []


def test_what_is_stored_is_capped(backend: Backend) -> None:
    key = backend.new_key("rollouts")
    job_id = claimed_job(backend, key)
    long = sample("x" * 9_000, "y" * 20_000)
    long["completions"][0]["advantage"] = float("nan")  # not JSON: stored as null
    record(backend, job_id, 0, [long] + [sample(f"p{i}", "a") for i in range(rollouts.MAX_PER_STEP + 5)])
    assert stored(backend, job_id) == rollouts.MAX_PER_STEP  # the first 64 prompts of the step
    oldest = get_rollouts(backend, key, job_id, step=0, limit=100)["data"][-1]
    assert oldest["prompt"] == "x" * rollouts.MAX_TEXT
    assert oldest["completions"][0]["text"] == "y" * rollouts.MAX_TEXT
    assert oldest["completions"][0]["advantage"] is None and oldest["completions"][0]["num_tokens"] == 20_000
    assert long["completions"][0]["text"] == "y" * 20_000  # the caller's dict left as it was

    # 33 steps of 64 prompts: 2,112 rows, of which the job keeps its newest 2,000; step 0 and most of step 1 go
    many = [sample(f"q{i}", "b") for i in range(rollouts.MAX_PER_STEP)]
    for step in range(1, 33):
        record(backend, job_id, step, many)
    assert stored(backend, job_id) == rollouts.MAX_PER_JOB == 2_000
    assert get_rollouts(backend, key, job_id, step=0)["data"] == []
    step1 = get_rollouts(backend, key, job_id, step=1, limit=100)["data"]
    assert [r["prompt"] for r in step1] == [f"q{i}" for i in range(63, 47, -1)]  # its newest 16 kept
    assert len(get_rollouts(backend, key, job_id, step=32, limit=100)["data"]) == 64


def test_a_stale_workers_rollouts_are_refused(backend: Backend) -> None:
    key = backend.new_key("rollouts")
    job_id = claimed_job(backend, key, owner="w1")
    for attempt, owner in ((0, "w2"), (1, "w1")):  # another owner; an attempt the job is not on
        with pytest.raises(lifecycle.LeaseLost):
            record(backend, job_id, 1, [sample("p", "a")], attempt=attempt, owner=owner)
    with backend.ctx.sessions() as session:
        assert lifecycle.requeue_job(session=session, job_id=job_id, attempt=0, owner="w1", reason="Shutting down")
    with pytest.raises(lifecycle.LeaseLost):  # the job is queued again: its old attempt writes nothing
        record(backend, job_id, 1, [sample("p", "a")])
    assert stored(backend, job_id) == 0
    assert get_rollouts(backend, key, job_id)["data"] == []


def test_another_keys_rollouts_are_not_found(backend: Backend) -> None:
    key = backend.new_key("rollouts")
    job_id = claimed_job(backend, key)
    record(backend, job_id, 1, [sample("p", "a")])
    with pytest.raises(openai.NotFoundError) as e:
        get_rollouts(backend, backend.new_key("stranger"), job_id)
    assert e.value.code == "job_not_found"
    assert len(get_rollouts(backend, backend.admin_key, job_id)["data"]) == 1  # an admin key sees every job
    with pytest.raises(openai.BadRequestError) as bad:
        get_rollouts(backend, key, job_id, step=-1)
    assert bad.value.param == "step"


def test_a_nul_written_by_the_model_is_stored(backend: Backend) -> None:
    """A byte-level model can write a NUL: PostgreSQL's JSONB refuses one, so it is kept as U+FFFD, not lost with
    the whole step (or the job)."""
    key = backend.new_key("rollouts-nul")
    job_id = claimed_job(backend, key)
    record(backend, job_id, 1, [sample("p\x00", "a\x00b")])
    (row,) = get_rollouts(backend, key, job_id)["data"]
    assert row["prompt"] == "p\ufffd" and row["completions"][0]["text"] == "a\ufffdb"
