"""The eval run task's body (`worker.evaluating.run_eval`) in this process, on both databases, with the real engine
answering on the tiny model (and judging as a score_model criterion): a worker killed mid-run, its attempt reaped, and
the next attempt grading only the items left (each item graded once, the answers those of an uninterrupted run); a
cancel and a lost lease between batches; a shutdown giving the run back; and failures that name their field (a file
deleted, python graders switched off since the run was made, a run reaped past the restart cap).

Batches of 2 items (`max_batch_size`), so 8 items are 4 batches."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

from app.db.base import utcnow
from app.db.models import EvalOutputItem, EvalRun, File
from app.schemas.evals import EvalCreate, RunCreate
from app.services import evals
from tests.worker.conftest import TINY, WorkerEnv
from worker import evaluating, training
from worker.context import WorkerContext
from worker.tasks import reap_eval_runs

MARKERS = ["", "q" * 40, "", "", "q" * 40, "", "q" * 40, ""]  # string_check (output like marker): 5 pass, 3 fail
STRING_CHECK = {"type": "string_check", "name": "marker", "input": "{{sample.output_text}}",
                "reference": "{{item.marker}}", "operation": "like"}
JUDGE = {"type": "score_model", "name": "judge", "model": TINY, "pass_threshold": 0.5,
         "sampling_params": {"max_completions_tokens": 6, "temperature": 0},
         "input": [{"role": "user", "content": "Score from 0 to 1: {{sample.output_text}}"}]}


class Killed(BaseException):
    """The worker process dying: nothing after it runs in the attempt, and nothing catches it."""


def batched(env: WorkerEnv, **overrides: Any) -> WorkerContext:
    return dataclasses.replace(env.ctx, settings=env.settings.model_copy(update={"max_batch_size": 2, **overrides}))


def create(env: WorkerEnv, criteria: list[dict[str, Any]] | None = None, source: dict[str, Any] | None = None,
           settings: Any = None) -> str:
    settings = settings or env.settings
    rows = [{"item": {"question": f"{k} + {k}?", "marker": m}} for k, m in enumerate(MARKERS)]
    with env.ctx.sessions() as session:
        ev = evals.create_eval(session=session, settings=settings, key=env.key, payload=EvalCreate.model_validate({
            "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
            "testing_criteria": criteria or [STRING_CHECK, JUDGE]}))
        run = evals.create_run(session=session, settings=settings, broker=env.broker,  # type: ignore[arg-type]
                               key=env.key, eval_id=ev.id, payload=RunCreate.model_validate({"data_source": {
                                   "type": "completions", "model": TINY,
                                   "source": source or {"type": "file_content", "content": rows},
                                   "input_messages": {"type": "template", "template": [
                                       {"role": "user", "content": "{{item.question}}"}]},
                                   "sampling_params": {"temperature": 0.8, "max_completion_tokens": 6, "seed": 5}}}))
        return run.id


def run(ctx: WorkerContext, run_id: str, attempt: int = 0) -> str:
    return evaluating.run_eval(ctx, run_id, attempt, f"test@host/1/2/{secrets.token_hex(4)}")


def row_of(env: WorkerEnv, run_id: str) -> EvalRun:
    with env.ctx.sessions() as session:
        row = session.get(EvalRun, run_id)
        assert row is not None
        return row


def items_of(env: WorkerEnv, run_id: str) -> list[EvalOutputItem]:
    with env.ctx.sessions() as session:
        return list(session.scalars(select(EvalOutputItem).where(EvalOutputItem.run_id == run_id)
                                    .order_by(EvalOutputItem.datasource_item_id)))


def after_batches(monkeypatch: pytest.MonkeyPatch, n: int, action: Callable[[], None]) -> list[int]:
    """Run `action()` as batch n + 1 starts to be answered (the first n recorded); returns the item numbers the
    attempt set out to answer, in order."""
    original = evaluating.answer_and_grade
    sampled: list[int] = []
    batches: list[Any] = []

    def answer_and_grade(ctx: WorkerContext, row: EvalRun, criteria: Any, sampler: Any,
                         batch: list[tuple[int, dict[str, Any]]]) -> Any:
        batches.append(batch)
        sampled.extend(i for i, _ in batch)
        if len(batches) == n + 1:
            action()
        return original(ctx, row, criteria, sampler, batch)

    monkeypatch.setattr(evaluating, "answer_and_grade", answer_and_grade)
    return sampled


def expire(env: WorkerEnv, run_id: str) -> None:
    with env.ctx.sessions() as session:
        session.execute(update(EvalRun).where(EvalRun.id == run_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()


def answers(env: WorkerEnv, run_id: str) -> list[str]:
    return [o.sample["output"][0]["content"] for o in items_of(env, run_id)]


def test_a_killed_worker_resumes_and_grades_each_item_once(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = batched(env)
    reference = create(env)
    assert run(ctx, reference) == "completed"  # uninterrupted, for comparison

    run_id = create(env)
    assert env.broker.evals_sent[-1] == (run_id, 0)

    def die() -> None:
        raise Killed

    first = after_batches(monkeypatch, 2, die)
    with pytest.raises(Killed):
        run(ctx, run_id)
    assert first == [0, 1, 2, 3, 4, 5]  # it died answering the third batch
    row = row_of(env, run_id)
    assert (row.status, row.attempt, row.result_counts["total"]) == ("in_progress", 0, 4)
    before = {o.datasource_item_id: o.id for o in items_of(env, run_id)}
    assert sorted(before) == [0, 1, 2, 3]

    expire(env, run_id)
    with env.ctx.sessions() as session:
        assert reap_eval_runs(session, env.ctx) == 1
    row = row_of(env, run_id)
    assert (row.status, row.attempt, row.restarts, row.lease_owner) == ("queued", 1, 1, None)
    assert env.broker.evals_sent[-1] == (run_id, 1)
    assert run(ctx, run_id, attempt=0) == "dropped"  # the dead attempt's message, redelivered
    second = after_batches(monkeypatch, 99, lambda: None)
    assert run(ctx, run_id, attempt=1) == "completed"
    assert second == [4, 5, 6, 7]  # only what no attempt recorded

    outputs = items_of(env, run_id)
    assert [o.datasource_item_id for o in outputs] == list(range(8))
    assert {o.datasource_item_id: o.id for o in outputs if o.datasource_item_id < 4} == before  # kept, not redone
    assert answers(env, run_id) == answers(env, reference)  # item k sampled with seed + k, whatever the attempt
    row = row_of(env, run_id)
    assert row.status == "completed" and row.result_counts["total"] == 8 and row.result_counts["errored"] == 0
    marker, judge = row.per_testing_criteria_results
    assert (marker["passed"], marker["failed"]) == (5, 3) and judge["passed"] + judge["failed"] == 8
    assert row.per_model_usage[0]["invocation_count"] == 8
    assert all(0.0 <= o.results[1]["score"] <= 1.0 for o in outputs)


def test_a_cancel_is_honoured_between_batches(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = create(env, [STRING_CHECK])

    def cancel() -> None:
        with env.ctx.sessions() as session:
            row = evals.cancel_run(session=session, key=env.key, eval_id=row_of(env, run_id).eval_id, run_id=run_id)
            assert (row.status, row.cancel_requested) == ("in_progress", True)

    after_batches(monkeypatch, 1, cancel)
    assert run(batched(env), run_id) == "canceled"
    row = row_of(env, run_id)
    assert (row.status, row.lease_owner, row.result_counts["total"]) == ("canceled", None, 4)  # graded items stay
    assert len(items_of(env, run_id)) == 4


def test_a_lost_lease_writes_nothing_more(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = create(env, [STRING_CHECK])

    def taken_over() -> None:
        with env.ctx.sessions() as session:
            session.execute(update(EvalRun).where(EvalRun.id == run_id).values(lease_owner="another-worker"))
            session.commit()

    after_batches(monkeypatch, 1, taken_over)
    assert run(batched(env), run_id) == "lost"
    row = row_of(env, run_id)
    assert (row.status, row.lease_owner, row.result_counts["total"]) == ("in_progress", "another-worker", 2)
    assert len(items_of(env, run_id)) == 2


def test_a_shutting_down_worker_gives_the_run_back(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = create(env, [STRING_CHECK])
    after_batches(monkeypatch, 1, training.stopping.set)
    try:
        assert run(batched(env), run_id) == "requeued"
    finally:
        training.stopping.clear()
    row = row_of(env, run_id)
    assert (row.status, row.attempt, row.restarts) == ("queued", 1, 0)
    assert env.broker.evals_sent[-1] == (run_id, 1)
    assert run(batched(env), run_id, attempt=1) == "completed"
    assert [o.datasource_item_id for o in items_of(env, run_id)] == list(range(8))


def test_failures_name_their_field(env: WorkerEnv) -> None:
    file_id = env.upload([{"item": {"question": "1 + 1?", "marker": ""}}])  # purpose fine-tune: accepted
    deleted = create(env, [STRING_CHECK], source={"type": "file_id", "id": file_id})
    with env.ctx.sessions() as session:
        session.execute(update(File).where(File.id == file_id).values(deleted_at=utcnow()))
        session.commit()
    assert run(env.ctx, deleted) == "failed"
    error = row_of(env, deleted).error
    assert error is not None and (error["code"], error["param"]) == ("file_not_found", "data_source.source.id")

    python = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}
    allowed = env.settings.model_copy(update={"allow_python_graders": True})
    switched_off = create(env, [python], settings=allowed)
    assert run(env.ctx, switched_off) == "failed"  # the operator turned python graders off since
    error = row_of(env, switched_off).error
    assert error is not None and error["code"] == "grader_unavailable" and "python" in error["message"]

    reaped = create(env, [STRING_CHECK])
    with env.ctx.sessions() as session:
        session.execute(update(EvalRun).where(EvalRun.id == reaped).values(
            status="in_progress", lease_owner="dead", restarts=env.settings.max_job_restarts))
        session.commit()
    expire(env, reaped)
    with env.ctx.sessions() as session:
        reap_eval_runs(session, env.ctx)
    assert (reaped, 1) not in env.broker.evals_sent  # past the cap: failed, not sent again
    row = row_of(env, reaped)
    assert row.status == "failed" and row.error is not None and row.error["code"] == "worker_lost"
