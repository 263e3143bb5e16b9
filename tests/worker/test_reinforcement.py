"""Reinforcement jobs in the training task, on a real database with the real engine: GRPO rewarded by the job's
grader, its metrics in the events, each checkpoint's eval reward, rollouts kept with the job, a judge loaded in the
worker, pause and resume to the same bits, and a grader that can no longer run failing the job with a clear error."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from sqlalchemy import select

from app.db.models import JobRollout
from app.schemas.jobs import JobCreate
from app.services import jobs
from tests.worker.conftest import TINY, WorkerEnv
from tests.worker.test_training import assert_same, at_step, final_adapter, owner
from worker import training
from worker.context import WorkerContext

GRADER = {"type": "string_check", "name": "has_a", "input": "{{sample.output_text}}", "reference": "{{item.want}}",
          "operation": "like"}


def prompts(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"Say something about {i}."}], "want": "a"} for i in range(n)]


def create(env: WorkerEnv, *, grader: dict[str, Any] | None = None, validation: bool = True, seed: int = 7,
           settings: Any = None, **hp: Any) -> str:
    defaults = {"n_epochs": 1, "batch_size": 2, "learning_rate": 5e-3, "lora_r": 4, "n_checkpoints": 2,
                "max_seq_length": 96, "num_generations": 2, "max_completion_length": 4, "eval_samples": 2}
    payload = JobCreate.model_validate({
        "model": TINY, "training_file": env.upload(prompts(8)), "seed": seed,
        "validation_file": env.upload(prompts(3)) if validation else None,
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader or GRADER,
                                                              "hyperparameters": {**defaults, **hp}}}})
    with env.ctx.sessions() as session:
        return jobs.create_job(session=session, settings=settings or env.settings, broker=env.broker,  # type: ignore[arg-type]
                               key=env.key, payload=payload, idempotency_key=secrets.token_hex(8),
                               retry_count=0).id


def run(env: WorkerEnv, job_id: str, attempt: int = 0, ctx: WorkerContext | None = None) -> str:
    return training.run_job(ctx or env.ctx, job_id, attempt, owner())


def rollouts(env: WorkerEnv, job_id: str) -> list[JobRollout]:
    with env.ctx.sessions() as session:
        return list(session.scalars(select(JobRollout).where(JobRollout.job_id == job_id).order_by(JobRollout.id)))


def test_a_reinforcement_job_reports_rewards_checkpoints_and_rollouts(env: WorkerEnv) -> None:
    job_id = create(env)  # 8 prompts, 2 per step: 4 steps, checkpoints (and evaluations) at 2 and 4
    assert run(env, job_id) == "succeeded", env.job(job_id).error
    metrics = [e.data for e in env.events(job_id) if e.type == "metrics" and e.data and "checkpoint" not in e.data]
    train = [m for m in metrics if "train_reward_mean" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(0 <= m["train_reward_mean"] <= 1 and "rewards/has_a/mean" in m and "kl" not in m for m in train)
    assert all("completions/mean_length" in m and "time/generation_s" in m for m in train)
    assert [m["step"] for m in metrics if "valid_reward_mean" in m] == [2, 4]
    checkpoints = env.checkpoints(job_id)
    assert [c.step_number for c in checkpoints] == [2, 4]
    for c in checkpoints:  # each checkpoint carries its evaluation, and the step's training reward
        assert c.metrics["eval_step"] == c.step_number and 0 <= c.metrics["valid_reward_mean"] <= 1
        assert "train_reward_mean" in c.metrics
    kept = rollouts(env, job_id)
    assert sorted({r.step for r in kept}) == [1, 2, 3, 4] and len(kept) == 8  # both prompts of each step
    from tests.worker.test_results import result_files

    header = result_files(env, job_id)["step_metrics.csv"].decode().splitlines()[0].split(",")
    assert header[:3] == ["step", "train_loss", "train_reward_mean"] and "valid_reward_mean" in header
    completion = kept[0].data["completions"][0]
    assert len(kept[0].data["completions"]) == 2 and kept[0].data["prompt"][0]["role"] == "user"
    assert completion["rewards"]["has_a"] in (0.0, 1.0) and completion["details"]["has_a"]["passed"] in (True, False)


def test_pause_and_resume_give_the_same_adapter(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = create(env, validation=False, n_checkpoints=1)
    assert run(env, straight) == "succeeded"
    job_id = create(env, validation=False, n_checkpoints=1)
    at_step(monkeypatch, 2, lambda _: env.update_job(job_id, stop_requested="pause"))
    assert run(env, job_id) == "paused"
    monkeypatch.undo()
    with env.ctx.sessions() as session:
        jobs.resume_job(session=session, broker=env.broker, key=env.key, job_id=job_id)  # type: ignore[arg-type]
    assert run(env, job_id, attempt=1) == "succeeded"
    assert_same(final_adapter(env, job_id), final_adapter(env, straight))  # sampled and trained as if never paused


def test_a_model_grader_is_judged_in_the_worker(env: WorkerEnv) -> None:
    judge = {"type": "score_model", "name": "judge", "model": TINY, "range": [0, 1],
             "sampling_params": {"max_completions_tokens": 8, "temperature": 0},
             "input": [{"role": "user", "content": "Score this reply from 0 to 1: {{sample.output_text}}"}]}
    job_id = create(env, grader=judge, validation=False, n_checkpoints=1)
    assert run(env, job_id) == "succeeded", env.job(job_id).error
    details = [c["details"]["judge"] for r in rollouts(env, job_id) for c in r.data["completions"]]
    # a random tiny judge rarely writes a score; what matters is that it was loaded and asked, not refused
    assert details and all(e["code"] != "model_grader_server_error" for d in details for e in d.get("errors", []))


def test_a_grader_that_can_no_longer_run_fails_the_job_clearly(env: WorkerEnv) -> None:
    python = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}
    allowed = env.settings.model_copy(update={"allow_python_graders": True})
    job_id = create(env, grader=python, validation=False, settings=allowed)
    assert run(env, job_id) == "failed"  # the worker's settings do not allow python graders
    error = env.job(job_id).error or {}
    assert error["code"] == "grader_unavailable" and "UNSLOTH_ALLOW_PYTHON_GRADERS" in error["message"]
    assert error["param"] == "method.reinforcement.grader"
