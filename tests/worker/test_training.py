"""The training task's body, in this process on a real database with the real engine: success with metrics and
servable checkpoints, duplicate deliveries, cancel, pause and resume, preemption, a lost lease, and the failures a
user can act on. Mid-training actions are hooked to an exact step, so each test is deterministic."""

from __future__ import annotations

import importlib
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from app.services import jobs, lifecycle
from app.services.hyperparameters import stored_hyperparameters
from tests.worker.conftest import TINY, WorkerEnv, fact_rows
from unsloth_core.checkpoint import is_complete
from worker import failures, training
from worker.context import WorkerContext


def owner() -> str:
    return f"test@host/1/2/{secrets.token_hex(4)}"


def run(env: WorkerEnv, job_id: str, attempt: int = 0, ctx: WorkerContext | None = None) -> str:
    return training.run_job(ctx or env.ctx, job_id, attempt, owner())


def at_step(monkeypatch: pytest.MonkeyPatch, step: int, action: Callable[[training.JobCallbacks], None]) -> None:
    """Run `action` right after the metrics of `step` are recorded (once)."""
    original = training.JobCallbacks.on_log
    done: list[bool] = []

    def on_log(self: training.JobCallbacks, metrics: dict[str, Any]) -> None:
        original(self, metrics)
        if metrics.get("step") == step and "loss" in metrics and not done:
            done.append(True)
            action(self)

    monkeypatch.setattr(training.JobCallbacks, "on_log", on_log)


def metric_steps(env: WorkerEnv, job_id: str) -> list[int]:
    return [e.data["step"] for e in env.events(job_id)
            if e.type == "metrics" and e.data and "train_loss" in e.data and "checkpoint" not in e.data]


def terminal_events(env: WorkerEnv, job_id: str) -> list[str]:
    return [e.data["status"] for e in env.events(job_id)
            if e.data and e.data.get("status") in ("succeeded", "failed", "cancelled")]


def final_adapter(env: WorkerEnv, job_id: str) -> dict[str, torch.Tensor]:
    job = env.job(job_id)
    finals = sorted(lifecycle.job_dir(env.settings, job_id).glob("attempt-*/final"))
    assert job.status == "succeeded" and len(finals) == 1
    return load_file(str(finals[0] / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_job_runs_to_success_with_metrics_and_servable_checkpoints(env: WorkerEnv, tiny_base: Path) -> None:
    job_id = env.create_job(env.upload(fact_rows(12)), n_epochs=2, n_checkpoints=3)  # 12 steps, a checkpoint every 4
    assert run(env, job_id) == "succeeded"
    job = env.job(job_id)
    assert job.fine_tuned_model == f"ft:{TINY}::{job_id}" and job.trained_tokens and job.trained_tokens > 0
    assert (job.progress or {})["step"] == 12 and job.lease_owner is None and job.finished_at is not None
    assert metric_steps(env, job_id) == list(range(1, 13))
    checkpoints = env.checkpoints(job_id)
    assert [c.step_number for c in checkpoints] == [4, 8, 12]
    from unsloth_core.checkpoint import load_model
    from unsloth_core.lora import load_adapter

    for c in checkpoints:
        path = env.settings.data_dir / c.path
        assert is_complete(path) and (path / "adapter_config.json").is_file() and "train_loss" in c.metrics
        assert c.model_id == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}"
    load_adapter(load_model(tiny_base), env.settings.data_dir / checkpoints[0].path)  # servable as it stands
    assert terminal_events(env, job_id) == ["succeeded"]
    events = len(env.events(job_id))
    assert run(env, job_id) == "dropped"  # the same message again: acknowledged, nothing done
    assert len(env.events(job_id)) == events and env.job(job_id).status == "succeeded"


def test_a_qlora_job_trains_on_a_4bit_base(env: WorkerEnv) -> None:
    """`load_in_4bit` reaches the engine: same data and seed, a different adapter than on the 16-bit base."""
    data = env.upload(fact_rows(8))
    qlora, plain = env.create_job(data, load_in_4bit=True), env.create_job(data)
    assert run(env, qlora) == "succeeded" and run(env, plain) == "succeeded"
    assert stored_hyperparameters(env.job(qlora).method)["load_in_4bit"] is True
    assert stored_hyperparameters(env.job(plain).method)["load_in_4bit"] is False
    a, b = final_adapter(env, qlora), final_adapter(env, plain)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)


def test_cancel_stops_within_a_step(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = env.create_job(env.upload(fact_rows(40)))  # 20 steps
    at_step(monkeypatch, 3, lambda _: env.update_job(job_id, stop_requested="cancel"))
    assert run(env, job_id) == "cancelled"
    job = env.job(job_id)
    assert job.status == "cancelled" and job.stop_requested is None and job.finished_at is not None
    assert max(metric_steps(env, job_id)) <= 4 and job.fine_tuned_model is None
    assert terminal_events(env, job_id) == ["cancelled"]


def test_pause_then_resume_finishes_from_the_checkpoint(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    training_file = env.upload(fact_rows(16, seed=3))
    straight = env.create_job(training_file, n_epochs=2)  # 16 steps, checkpoints at 8 and 16
    assert run(env, straight) == "succeeded"

    job_id = env.create_job(training_file, n_epochs=2)
    at_step(monkeypatch, 5, lambda _: env.update_job(job_id, stop_requested="pause"))
    assert run(env, job_id) == "paused"
    job = env.job(job_id)
    assert (job.status, job.stop_requested, job.lease_owner) == ("paused", None, None)
    assert [c.step_number for c in env.checkpoints(job_id)] == [5]  # the pause's own checkpoint
    monkeypatch.undo()
    with env.ctx.sessions() as session:
        jobs.resume_job(session=session, broker=env.broker, key=env.key, job_id=job_id)  # type: ignore[arg-type]
    assert env.broker.sent[-1] == (job_id, 1)
    assert run(env, job_id, attempt=1) == "succeeded"
    assert metric_steps(env, job_id) == list(range(1, 17))  # steps 1-5, then 6-16: nothing trained twice
    assert any("Resuming from the checkpoint at step 5" in e.message for e in env.events(job_id))
    assert_same(final_adapter(env, job_id), final_adapter(env, straight))  # bit for bit, as if never paused
    assert terminal_events(env, job_id) == ["succeeded"]


@pytest.mark.parametrize("how", ["signal", "notice", "shutdown-hook"])
def test_preempted_job_checkpoints_requeues_and_resumes(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch,
                                                       how: str) -> None:
    job_id = env.create_job(env.upload(fact_rows(12)))  # 6 steps, checkpoints at 3 and 6

    def preempt(callbacks: training.JobCallbacks) -> None:
        if how == "signal":  # SIGTERM reached the pool process
            training.preempted.set()
        elif how == "notice":  # the worker's main process told its pool it is shutting down
            training.stopping.set()
        else:  # the worker's main process got SIGTERM and marked its jobs
            with env.ctx.sessions() as session:
                node = callbacks.lease.owner.split("/")[0] + "/1/"
                assert lifecycle.preempt_jobs(session=session, owner_prefix=node) == 1

    at_step(monkeypatch, 2, preempt)
    try:
        assert run(env, job_id) == "requeued"
        assert not training.preempted.is_set()  # only that job was preempted
    finally:
        training.stopping.clear()
    job = env.job(job_id)
    assert (job.status, job.attempt, job.restarts, job.stop_requested) == ("queued", 1, 0, None)
    assert env.broker.sent[-1] == (job_id, 1)
    assert [c.step_number for c in env.checkpoints(job_id)] == [2]
    monkeypatch.undo()
    assert run(env, job_id, attempt=0) == "dropped"  # the old message, redelivered: stale
    assert run(env, job_id, attempt=1) == "succeeded"
    assert metric_steps(env, job_id) == list(range(1, 7))


def test_lost_lease_stops_without_writing(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = env.create_job(env.upload(fact_rows(12)), n_checkpoints=3)  # 6 steps, checkpoints at 2, 4, 6
    taken: list[int] = []

    def reap(_: training.JobCallbacks) -> None:  # the worker looked dead: the reaper gave the job to another
        from datetime import timedelta

        from app.db.base import utcnow

        later = utcnow() + timedelta(seconds=60)
        for _try in range(100):  # the heartbeat may hold the row for an instant: a reaper skips it until next time
            with env.ctx.sessions() as session:
                if (job_id, 1) in lifecycle.reap_expired(session=session, settings=env.settings, now=later):
                    break
            time.sleep(0.02)
        taken.append(len(env.events(job_id)))

    at_step(monkeypatch, 3, reap)
    assert run(env, job_id) == "lost"
    job = env.job(job_id)
    assert (job.status, job.attempt, job.restarts, job.lease_owner) == ("queued", 1, 1, None)
    assert len(env.events(job_id)) == taken[0]  # nothing written by the old attempt after the takeover
    assert [c.step_number for c in env.checkpoints(job_id)] == [2]
    monkeypatch.undo()
    assert run(env, job_id, attempt=1) == "succeeded"
    assert metric_steps(env, job_id) == [1, 2, 3, 3, 4, 5, 6]  # step 3 again: it was after the last checkpoint
    assert terminal_events(env, job_id) == ["succeeded"]


def _corrupt(env: WorkerEnv, file_id: str) -> None:
    (env.settings.files_dir / f"{file_id}.jsonl").write_bytes(b'{"messages": "not a list"}\nnot json\n')


def _delete(env: WorkerEnv, file_id: str) -> None:
    (env.settings.files_dir / f"{file_id}.jsonl").unlink()


# The module itself: `unsloth_core.finetune` as an attribute is the exported function until the module is imported.
FINETUNE_MODULE = importlib.import_module("unsloth_core.finetune")


def _oom(*_: Any, **__: Any) -> Any:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _bug(*_: Any, **__: Any) -> Any:
    raise RuntimeError("something unexpected")


@pytest.mark.parametrize(("case", "code", "param"), [
    ("bad data", "invalid_training_file", "training_file"),
    ("file gone", "file_unreadable", "training_file"),
    ("model gone", "model_not_found", "model"),
    ("out of memory", "out_of_memory", "method.supervised.hyperparameters.batch_size"),
    ("bug", "internal_error", None),
])
def test_failures_a_user_can_act_on(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch, tiny_base: Path, case: str,
                                    code: str, param: str | None) -> None:
    model = TINY
    if case == "model gone":
        model = f"gone-{secrets.token_hex(3)}"
        (env.settings.models_dir / model).symlink_to(tiny_base, target_is_directory=True)
    file_id = env.upload(fact_rows(8))
    job_id = env.create_job(file_id, model=model)
    other = env.create_job(env.upload(fact_rows(4)))
    {"bad data": lambda: _corrupt(env, file_id), "file gone": lambda: _delete(env, file_id),
     "model gone": lambda: (env.settings.models_dir / model).unlink(),
     "out of memory": lambda: monkeypatch.setattr(FINETUNE_MODULE, "finetune", _oom),
     "bug": lambda: monkeypatch.setattr(FINETUNE_MODULE, "finetune", _bug)}[case]()
    assert run(env, job_id) == "failed"
    job = env.job(job_id)
    assert job.status == "failed" and job.error is not None and (job.error["code"], job.error["param"]) == (code,
                                                                                                          param)
    if case == "out of memory":
        assert "batch_size=2" in job.error["message"] and "max_seq_length=128" in job.error["message"]
    assert job.lease_owner is None and job.finished_at is not None and job.fine_tuned_model is None
    assert env.checkpoints(job_id) == [] and terminal_events(env, job_id) == ["failed"]
    assert env.job(other).status == "queued"  # nothing else touched
    monkeypatch.undo()
    assert run(env, other) == "succeeded"


def test_a_job_past_the_time_limit_fails(env: WorkerEnv) -> None:
    job_id = env.create_job(env.upload(fact_rows(8)))
    ctx = WorkerContext(settings=env.settings.model_copy(update={"max_job_s": 0.0}), engine=env.ctx.engine,
                        sessions=env.ctx.sessions, broker=env.ctx.broker)
    assert run(env, job_id, ctx=ctx) == "failed"
    assert (env.job(job_id).error or {})["code"] == "job_timeout"


def test_a_database_hiccup_costs_a_metrics_event_not_the_job(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    job_id = env.create_job(env.upload(fact_rows(8)))  # 4 steps
    failures = {"record_metrics": [2], "complete_job": [1]}  # which calls fail once (1-based)
    for name, which in failures.items():
        original = getattr(lifecycle, name)
        calls: list[int] = []

        def flaky(*args: Any, _original: Any = original, _calls: list[int] = calls, _which: list[int] = which,
                  **kwargs: Any) -> Any:
            _calls.append(1)
            if len(_calls) in _which:
                raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(lifecycle, name, flaky)
    assert run(env, job_id) == "succeeded"
    assert metric_steps(env, job_id) == [1, 3, 4]  # step 2's event was lost; the job was not
    assert env.job(job_id).status == "succeeded"


def test_a_checkpoint_losing_tool_calls_is_a_warning_event(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's tool-call figures (unsloth_core/tool_call_check.py; the tiny base's context is too short for a
    tools prompt, so they are given here) reach the checkpoint under their API names, and a checkpoint far below the
    start's figure is said in a warning event; one within TOOL_CALL_DROP of it is not."""
    figures = iter([0.85, 0.2])
    original = training.JobCallbacks.on_checkpoint

    def on_checkpoint(self: training.JobCallbacks, path: Path, step: int, metrics: dict[str, Any]) -> None:
        original(self, path, step, {**metrics, "eval_tool_calls/start_valid": 0.9,
                                    "eval_tool_calls/valid": next(figures), "eval_tool_calls/matched": 0.1})

    monkeypatch.setattr(training.JobCallbacks, "on_checkpoint", on_checkpoint)
    job_id = env.create_job(env.upload(fact_rows(8)), n_checkpoints=2)  # 4 steps, checkpoints at 2 and 4
    assert run(env, job_id) == "succeeded"
    checkpoints = env.checkpoints(job_id)
    assert [(c.step_number, c.metrics["tool_call_valid_rate"], c.metrics["start_tool_call_valid_rate"],
             c.metrics["tool_call_match_rate"]) for c in checkpoints] == [(2, 0.85, 0.9, 0.1), (4, 0.2, 0.9, 0.1)]
    warnings = [e for e in env.events(job_id) if e.message.startswith("Tool-call check")]
    assert [(e.level, e.data) for e in warnings] == [
        ("warn", {"step": 4, "tool_call_valid_rate": 0.2, "start_tool_call_valid_rate": 0.9})]
    assert "20% of the data's tool-use turns" in warnings[0].message and "against 90%" in warnings[0].message


@pytest.mark.parametrize(("error", "where"), [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU"),
    (RuntimeError("CUDA error: out of memory"), "GPU"),
    (RuntimeError("Triton Error [CUDA]: out of memory"), "GPU"),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), "GPU"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes"), "host"),
    (MemoryError(), "host"),
])
def test_out_of_memory_names_the_memory_that_ran_out(error: BaseException, where: str) -> None:
    failure = failures.classify(error, model=TINY, method_type="supervised",
                                hyperparameters={"batch_size": 2, "max_seq_length": 128})
    assert failure.code == "out_of_memory" and f"ran out of {where} memory" in failure.message


def test_a_failed_job_gives_its_memory_back(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model a failing job loaded is garbage once the failure is recorded, not kept alive by the exception's
    traceback into the next job (a worker reuses its process in embedded mode)."""
    import gc
    import weakref

    loaded: list[weakref.ref[Any]] = []
    real_load_base = FINETUNE_MODULE.load_base

    def load_then_fail(*args: Any, **kwargs: Any) -> Any:
        model, _ = real_load_base(*args, **kwargs)
        loaded.append(weakref.ref(model))
        holder = [model]  # a reference cycle through this frame, as autograd graphs and tracebacks make
        holder.append(holder)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(FINETUNE_MODULE, "load_base", load_then_fail)
    gc.disable()  # only the worker's own collection may free the cycle
    try:
        assert run(env, env.create_job(env.upload(fact_rows(8)))) == "failed"
        assert loaded and loaded[0]() is None
    finally:
        gc.enable()
