"""One attempt of a fine-tuning job, from claim to its end: the body of the `train` task.

claim (conditional UPDATE; zero rows: a duplicate or stale message, dropped) -> heartbeat the lease -> check the base
model and files -> the engine's `finetune`, resuming from the checkpoint the database recorded -> per step: the stop
request (cancel, pause, preempt); every N steps: a metrics event; per checkpoint: a row, servable at once -> the end:
succeeded, cancelled, paused, requeued (preempted by a shutdown), or failed with a code. Every write is fenced by
job id + attempt + lease owner; a lost lease stops the attempt without writing anything more.

A full disk pauses the job (error `storage_full`), whether a checkpoint's files or its row could not be written (the
embedded mode's SQLite database shares the data dir's disk): what was written but cannot be recorded is deleted, which
gives the pause's write room. When even that write fails, the attempt ends unrecorded: the job stays `running` until
its lease expires, then the reaper requeues it (once the database can be written) and it resumes from its last
recorded checkpoint.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import File, Job, JobStatus, Model
from app.services import dispatch, fair_queue, hyperparameters, lifecycle, storage
from app.services.lifecycle import LeaseLost
from worker import failures
from worker.context import WorkerContext
from worker.failures import JobFailure
from worker.lease import Heartbeat, Lease

if TYPE_CHECKING:
    from unsloth_core.lora import LoRAConfig
    from unsloth_core.trainer import StopRequest, TrainArgs, TrainResult

log = logging.getLogger("worker.training")
T = TypeVar("T")

preempted = threading.Event()  # SIGTERM reached this process mid-job: checkpoint and requeue that job
stopping = threading.Event()  # the worker is shutting down: checkpoint and requeue, and claim nothing new

# The trainer's metric names, as OpenAI's metrics events name them.
METRIC_NAMES = {"loss": "train_loss", "mean_token_accuracy": "train_mean_token_accuracy", "eval_loss": "valid_loss",
                "eval_mean_token_accuracy": "valid_mean_token_accuracy",
                # GRPO: the grader's mean score on the step's completions, and on held-out prompts
                "reward": "train_reward_mean", "reward_std": "train_reward_std", "eval_reward": "valid_reward_mean",
                "eval_reward_std": "valid_reward_std",
                # the tool-call check (unsloth_core/tool_call_check.py), and its figure for the model training started
                # from (the base, or the fine-tune being continued)
                "eval_tool_calls/valid": "tool_call_valid_rate", "eval_tool_calls/matched": "tool_call_match_rate",
                "eval_tool_calls/start_valid": "start_tool_call_valid_rate",
                "eval_tool_calls/start_matched": "start_tool_call_match_rate"}
# A checkpoint whose tool-call validity is this far below the start's gets a warning event.
TOOL_CALL_DROP = 0.1
# Our evaluations cover the whole validation file: OpenAI's full_valid_* names as well as its valid_* ones.
FULL_VALID = {"eval_loss": "full_valid_loss", "eval_mean_token_accuracy": "full_valid_mean_token_accuracy"}
# What a checkpoint's metrics keep of the latest logs (beside METRIC_NAMES' values).
CHECKPOINT_EXTRAS = ("epoch", "eval_step", *FULL_VALID.values())


@dataclass
class Plan:
    """What the engine is called with for this attempt."""

    base: Path
    train_file: Path
    validation_file: Path | None
    args: TrainArgs
    lora: LoRAConfig
    resume: Path | None
    resume_step: int | None
    job: Job | None = None
    init_adapter: Path | None = None  # the adapter of the fine-tune the job continues
    device: str = "cpu"  # where it trained (set when training starts)


def run_job(ctx: WorkerContext, job_id: str, attempt: int, owner: str) -> str:
    """Run one attempt; returns how it ended: dropped, lost, succeeded, failed, cancelled, paused, requeued or
    unrecorded (the database's disk is full). The attempt run may be another key's job, the one that has waited
    longest (app/services/fair_queue.py)."""
    job_id, attempt = take_turn(ctx, job_id, attempt)
    with ctx.sessions() as session:
        job = lifecycle.claim_job(session=session, job_id=job_id, attempt=attempt, owner=owner, lease=ctx.lease)
    if job is None:
        log.info("job %s attempt %d: not queued with this attempt (a duplicate or stale message); dropped", job_id,
                 attempt)
        return "dropped"
    lease = Lease(ctx, job_id, attempt, owner)
    try:
        with Heartbeat(lease, ctx.settings.heartbeat_s):
            return _run_claimed(ctx, job, lease)
    except LeaseLost:
        log.warning("job %s attempt %d: lease lost; stopped without writing", job_id, attempt)
        return "lost"
    except OperationalError as e:
        if not failures.is_storage_full(e):
            raise
        log.error("job %s attempt %d: the database's disk is full, so the attempt's end could not be recorded; the "
                  "job stays running until its lease expires, then it is requeued and resumes from its last recorded "
                  "checkpoint", job_id, attempt)
        return "unrecorded"
    finally:
        preempted.clear()
        _release_memory()


def take_turn(ctx: WorkerContext, job_id: str, attempt: int) -> tuple[str, int]:
    """The job this message's turn goes to (fair across keys); when it is another one, the message's own job is sent
    again, to the back of the queue, so it still has a message."""
    with ctx.sessions() as session:
        picked = fair_queue.pick(session, job_id, attempt)
        if picked != (job_id, attempt):
            log.info("job %s: its turn goes to job %s, whose key has waited longer; sent again", job_id, picked[0])
            dispatch.send_train(session=session, broker=ctx.broker, job_id=job_id, attempt=attempt)
    return picked


def _release_memory() -> None:
    """Give the job's memory back before the next job in this process: only here, once the exception (whose
    traceback holds the model, its optimizer state and activations) has been handled, is it all garbage."""
    import sys

    if "torch" not in sys.modules:  # nothing was loaded: no reason to import torch here
        return
    from unsloth_core.memory import release_memory

    release_memory()


def _run_claimed(ctx: WorkerContext, job: Job, lease: Lease) -> str:
    hp = hyperparameters.stored_hyperparameters(job.method)
    callbacks = JobCallbacks(ctx, lease, deadline=time.monotonic() + ctx.settings.max_job_s)
    try:
        plan = prepare(ctx, job)
        callbacks.checkpoint_step = plan.resume_step
        if plan.resume is not None:
            _event(ctx, lease, f"Resuming from the checkpoint at step {plan.resume_step}")
        result, final = _finetune(ctx, plan, callbacks)
    except LeaseLost:
        raise
    except Exception as e:
        if failures.is_storage_full(e):  # nothing the user did: pause, so a resume continues once space is back
            log.error("job %s attempt %d: the disk is full (%s); pausing the job", job.id, job.attempt, e)
            return _pause(ctx, lease, callbacks.step, failures.storage_full(job.id, callbacks.checkpoint_step))
        failure = failures.classify(e, model=job.model, method_type=job.method["type"], hyperparameters=hp)
        if failure.code in ("internal_error", "storage_error"):
            log.exception("job %s attempt %d failed", job.id, job.attempt)
        else:
            log.warning("job %s attempt %d failed: %s", job.id, job.attempt, failure)
        return _fail(ctx, lease, failure)
    return _finish(ctx, lease, result, final, callbacks, plan)


def prepare(ctx: WorkerContext, job: Job) -> Plan:
    """Check what the job needs is still there, resolve the engine's arguments and the checkpoint to resume from.
    Raises JobFailure."""
    settings = ctx.settings
    with ctx.sessions() as session:
        base, init_adapter = _starting_point(ctx, session, job.model)
        train_file = _readable_file(ctx, session.get(File, job.training_file), "training_file", job.training_file)
        validation_file = None
        if job.validation_file:
            validation_file = _readable_file(ctx, session.get(File, job.validation_file), "validation_file",
                                             job.validation_file)
        total_steps = int((job.progress or {}).get("total_steps") or 1)
        try:
            args, lora = hyperparameters.train_config(
                job.method, seed=job.seed, output_dir=storage.attempt_dir(settings, job.id, job.attempt),
                total_steps=total_steps, metrics_every=settings.metrics_every_steps)
        except (ValueError, KeyError, TypeError) as e:
            raise JobFailure("invalid_hyperparameters", f"The job's hyperparameters cannot be used: {e}",
                             f"method.{job.method['type']}.hyperparameters") from None
        resume = lifecycle.resume_checkpoint(session=session, settings=settings, job=job, usable=_complete)
        recorded = lifecycle.recorded_checkpoint_dirs(session=session, settings=settings, job_id=job.id)
    sweep_earlier_attempts(ctx, job, recorded)
    return Plan(base, train_file, validation_file, args, lora, resume[1] if resume else None,
                resume[0].step_number if resume else None, job, init_adapter)


def _starting_point(ctx: WorkerContext, session: Session, model_id: str) -> tuple[Path, Path | None]:
    """The base model's directory, and the adapter of the fine-tune (or checkpoint) the job continues, if any."""
    base = storage.base_model_dir(ctx.settings, model_id)
    if base is not None:
        return base, None
    row = session.get(Model, model_id)
    if row is None or row.kind == "base" or row.deleted_at is not None:
        raise failures.model_not_found(model_id)
    base = storage.base_model_dir(ctx.settings, row.root)
    if base is None:
        raise failures.model_not_found(row.root)
    adapter = storage.adapter_dir(ctx.settings, row.path)
    if adapter is None:
        raise JobFailure("model_not_found", f"The files of '{model_id}', which this job continues, are gone (it "
                                            "was deleted, or pruned as an old checkpoint); create the job again from "
                                            "a model that exists.", "model")
    return base, adapter


def _complete(path: Path) -> bool:
    from unsloth_core.checkpoint import is_complete

    return is_complete(path)


def sweep_earlier_attempts(ctx: WorkerContext, job: Job, recorded: set[Path]) -> None:
    """Delete the checkpoints earlier attempts of the job left that no row names: torn ones (a crash while one was
    being saved), and complete ones whose record was lost or that were pruned by a worker that died before deleting
    their files (the rows go first). None is ever resumed from, and each would stay on disk forever. The engine
    cleans the attempt's own directory; the earlier attempts' are ours. (An earlier attempt's worker may still be
    alive, frozen; its lease is gone, so losing its unrecorded files costs nothing: it can record nothing more.)"""
    from unsloth_core.train_checkpoint import list_checkpoints, remove_torn

    for attempt in range(job.attempt):
        directory = storage.attempt_dir(ctx.settings, job.id, attempt) / "checkpoints"
        for path in remove_torn(directory):
            log.warning("job %s: removed %s, torn by a crash of attempt %d", job.id, path, attempt)
        for _, path in list_checkpoints(directory):
            if path.resolve() not in recorded:
                shutil.rmtree(path, ignore_errors=True)
                log.warning("job %s: removed %s, a checkpoint of attempt %d that no row names (pruned, or its "
                            "record was lost)", job.id, path, attempt)


def _readable_file(ctx: WorkerContext, row: File | None, param: str, file_id: str) -> Path:
    if row is None or row.deleted_at is not None:
        raise failures.file_missing(param, file_id)
    path = storage.file_content(ctx.settings, row.path)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise failures.file_unreadable(param, file_id, e) from None
    return path


def _finetune(ctx: WorkerContext, plan: Plan, callbacks: JobCallbacks) -> tuple[TrainResult, Path]:
    import torch

    from app.inference.cache import resolve_device
    from unsloth_core.finetune import finetune

    if ctx.settings.torch_threads:
        torch.set_num_threads(ctx.settings.torch_threads)
    device = torch.device(resolve_device(ctx.settings.device))
    plan.device = str(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton launches on the current device, whatever its tensors' device
    method, judge = None, None
    eval_rewards: list[Any] = []
    hp = hyperparameters.stored_hyperparameters(plan.job.method) if plan.job is not None else {}
    if plan.job is not None and plan.job.method["type"] == "reinforcement":
        from worker.reinforcement import grpo_method

        method, judge = grpo_method(ctx, plan.job, device)
    elif plan.job is not None and hp.get("eval_graders") and plan.validation_file is not None:
        from worker.reinforcement import grader_rewards

        eval_rewards, judge = grader_rewards(ctx, plan.job, hp["eval_graders"], device)
    try:
        return finetune(plan.base, plan.train_file, plan.args, plan.lora, plan.validation_file, callbacks,
                        resume=plan.resume, device=device, method=method, init_adapter=plan.init_adapter,
                        eval_rewards=eval_rewards, eval_samples=int(hp.get("eval_samples", 32)))
    finally:
        if judge is not None:
            judge.close()


def _finish(ctx: WorkerContext, lease: Lease, result: TrainResult, final: Path, callbacks: JobCallbacks,
            plan: Plan) -> str:
    if result.status in ("completed", "early_stopped"):
        manifest = _manifest(ctx, plan)
        try:
            model = _final_write(ctx, lease, lambda session: lifecycle.complete_job(
                session=session, settings=ctx.settings, adapter_dir=final, trained_tokens=result.trained_tokens,
                manifest=manifest, **lease.fence))
        except (OperationalError, OSError) as e:  # the database's disk, or the result files' (the files dir's)
            if not failures.is_storage_full(e):
                raise
            return _pause_unrecorded(ctx, lease, final, result.step, callbacks)
        return "succeeded" if model else _lost(lease)
    if result.status == "paused" and callbacks.stop_reason == "preempt":
        reason = f"The worker is shutting down; checkpoint saved at step {result.step}"
        attempt = _final_write(ctx, lease, lambda session: lifecycle.requeue_job(session=session, reason=reason,
                                                                                 **lease.fence))
        if attempt is None:
            return _lost(lease)
        with ctx.sessions() as session:  # if this send fails, the re-sender sends it later
            dispatch.send_train(session=session, broker=ctx.broker, job_id=lease.job_id, attempt=attempt)
        return "requeued"
    status = JobStatus.CANCELLED if result.status == "cancelled" else JobStatus.PAUSED
    written = _final_write(ctx, lease, lambda session: lifecycle.stop_job(session=session, status=status,
                                                                          step=result.step, **lease.fence))
    return written or _lost(lease)


def _manifest(ctx: WorkerContext, plan: Plan) -> dict[str, Any]:
    """The job's reproducibility manifest; a failure to build it is reported inside it, never fails the job."""
    from worker.manifest import build_manifest

    assert plan.job is not None
    try:
        return build_manifest(ctx, plan.job, base=plan.base, init_adapter=plan.init_adapter, device=plan.device,
                              dtype=plan.args.dtype)
    except Exception as e:
        log.exception("job %s: its manifest could not be built", plan.job.id)
        return {"object": "fine_tuning.job.manifest", "job_id": plan.job.id, "error": f"{type(e).__name__}: {e}"}


def _pause(ctx: WorkerContext, lease: Lease, step: int, failure: JobFailure) -> str:
    """Paused with the failure as the job's error: its last recorded checkpoint stands (a torn write is never
    recorded), and the user's resume continues from it."""
    error = {"code": failure.code, "message": failure.message, "param": failure.param}
    written = _final_write(ctx, lease, lambda session: lifecycle.stop_job(
        session=session, status=JobStatus.PAUSED, step=step, error=error, **lease.fence))
    return written or _lost(lease)


def _pause_unrecorded(ctx: WorkerContext, lease: Lease, directory: Path, step: int, callbacks: JobCallbacks) -> str:
    """The final adapter is written but the database's disk is full: as if its write had failed. Unrecorded, it is
    garbage; deleting it gives its space back (to the pause's write, where the database shares the disk), and the
    resume trains again from the last checkpoint."""
    log.error("job %s attempt %d: the database's disk is full; pausing the job", lease.job_id, lease.attempt)
    shutil.rmtree(directory, ignore_errors=True)
    return _pause(ctx, lease, step, failures.storage_full(lease.job_id, callbacks.checkpoint_step))


def _fail(ctx: WorkerContext, lease: Lease, failure: JobFailure) -> str:
    ok = _final_write(ctx, lease, lambda session: lifecycle.fail_job(
        session=session, code=failure.code, message=failure.message, param=failure.param, **lease.fence))
    return "failed" if ok else _lost(lease)


def _final_write(ctx: WorkerContext, lease: Lease, write: Callable[[Session], T]) -> T:
    """The attempt's last write, retried through a short database outage for as long as the lease surely holds
    (the heartbeat stops once the attempt ends; the write clears the lease itself). A full disk is not retried:
    seconds do not free space, and the caller may (by deleting what cannot be recorded)."""
    lease.released.set()
    deadline = time.monotonic() + ctx.settings.lease_s / 2
    delay = 0.2
    while True:
        try:
            with ctx.sessions() as session:
                return write(session)
        except OperationalError as e:
            if time.monotonic() + delay > deadline or failures.is_storage_full(e):
                raise
            log.warning("job %s: the final write failed (%s); retrying", lease.job_id, type(e).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def _lost(lease: Lease) -> str:
    lease.lost.set()
    raise LeaseLost(lease.job_id)


def _event(ctx: WorkerContext, lease: Lease, message: str, data: dict[str, Any] | None = None) -> None:
    """An informational event: a database hiccup loses it rather than the attempt."""
    try:
        with ctx.sessions() as session:
            lifecycle.record_event(session=session, message=message, data=data, **lease.fence)
    except OperationalError as e:
        log.warning("job %s: event not recorded (%s): %s", lease.job_id, type(e).__name__, message)


class JobCallbacks:
    """The engine's hooks, bound to one leased attempt. Raising LeaseLost from any of them ends training at once."""

    def __init__(self, ctx: WorkerContext, lease: Lease, deadline: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx, self.lease, self.deadline, self.clock = ctx, lease, deadline, clock
        self.stop_reason: str | None = None
        self.step = 0  # the last step logged
        self.checkpoint_step: int | None = None  # the last checkpoint recorded (or resumed from)
        self._rate_origin: tuple[float, int] | None = None  # (time, step) of the first log, for the finish estimate
        self._latest: dict[str, Any] = {}  # the latest value of each metric, the latest evaluation's included

    def should_stop(self) -> StopRequest:
        stop = self.lease.check()
        if stop == "cancel":
            return "cancel"
        if stop in ("pause", "preempt") or preempted.is_set() or stopping.is_set():
            self.stop_reason = stop if stop == "pause" else "preempt"
            return "pause"  # the engine checkpoints, then stops
        if self.clock() > self.deadline:
            limit = self.ctx.settings.max_job_s
            raise JobFailure("job_timeout", f"The job ran longer than this server allows ({limit:.0f} s); use fewer "
                                            "epochs or a smaller training file.", None)
        return None

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.lease.ensure()
        step, total = int(metrics["step"]), int(metrics["total_steps"])
        self.step = step
        data = {METRIC_NAMES.get(k, k): v for k, v in metrics.items() if _json_number(v)}
        data.update({FULL_VALID[k]: v for k, v in metrics.items() if k in FULL_VALID and _json_number(v)})
        self._latest.update(data)
        if any(k.startswith("eval_") for k in metrics):
            self._latest["eval_step"] = step
        progress = {"step": step, "total_steps": total, "epoch": metrics.get("epoch"),
                    "train_loss": data.get("train_loss")}
        try:
            with self.ctx.sessions() as session:
                lifecycle.record_metrics(session=session, message=_metrics_message(data, step, total), data=data,
                                         progress=progress, estimated_finish=self._finish_estimate(step, total),
                                         **self.lease.fence)
        except OperationalError as e:  # a database hiccup costs these metrics, not the attempt
            log.warning("job %s: metrics of step %d not recorded (%s)", self.lease.job_id, step, type(e).__name__)

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
        self.lease.ensure()
        # The step's own log (its evaluation, when one ran at this step), over the latest values: a checkpoint
        # between evaluations carries the last one, with the step it was taken at.
        names = {*METRIC_NAMES.values(), *CHECKPOINT_EXTRAS}
        kept = {k: v for k, v in self._latest.items() if k in names or k.startswith("eval_rewards/")}
        kept.update({METRIC_NAMES.get(k, k): v for k, v in metrics.items()
                     if k in METRIC_NAMES or k in CHECKPOINT_EXTRAS})
        if metrics.get("samples") is not None:  # the probe prompts' answers (returned as the checkpoint's samples)
            kept["samples"] = metrics["samples"]
        try:
            with self.ctx.sessions() as session:
                row = lifecycle.record_checkpoint(session=session, settings=self.ctx.settings, step=step,
                                                  metrics=kept, adapter_dir=path, **self.lease.fence)
        except OperationalError as e:  # not recorded: a resume starts from the one before
            if failures.is_storage_full(e):  # as if its write had failed: deleted (giving its space back), and paused
                shutil.rmtree(path, ignore_errors=True)
                raise
            log.warning("job %s: checkpoint of step %d not recorded (%s)", self.lease.job_id, step, type(e).__name__)
            return
        if row is None:
            self.lease.lost.set()
            raise LeaseLost(self.lease.job_id)
        self.checkpoint_step = step
        self._warn_tool_calls(step, kept)

    def _warn_tool_calls(self, step: int, kept: dict[str, Any]) -> None:
        """A fine-tune losing tool calling is said where the user reads the job, while it runs."""
        now, start = kept.get("tool_call_valid_rate"), kept.get("start_tool_call_valid_rate")
        if now is None or start is None or now > start - TOOL_CALL_DROP:
            return
        message = (f"Tool-call check at step {step}: {now:.0%} of the data's tool-use turns get valid tool calls, "
                   f"against {start:.0%} before training")
        try:
            with self.ctx.sessions() as session:
                lifecycle.record_event(session=session, message=message, level="warn",
                                       data={"step": step, "tool_call_valid_rate": now,
                                             "start_tool_call_valid_rate": start}, **self.lease.fence)
        except OperationalError as e:
            log.warning("job %s: event not recorded (%s): %s", self.lease.job_id, type(e).__name__, message)

    def on_rollouts(self, step: int, rollouts: list[dict[str, Any]]) -> None:
        """A reinforcement step's sampled completions, kept with the job (GET .../rollouts)."""
        self.lease.ensure()
        try:
            with self.ctx.sessions() as session:
                lifecycle.record_rollouts(session=session, step=step, samples=rollouts, **self.lease.fence)
        except OperationalError as e:  # a database hiccup costs these samples, not the attempt
            log.warning("job %s: rollouts of step %d not recorded (%s)", self.lease.job_id, step, type(e).__name__)

    def on_epoch_end(self, epoch: int) -> None:
        _event(self.ctx, self.lease, f"Epoch {epoch + 1} done")

    def _finish_estimate(self, step: int, total: int) -> Any:
        now = self.clock()
        if self._rate_origin is None:
            self._rate_origin = (now, step)
            return None
        t0, s0 = self._rate_origin
        if step <= s0:
            return None
        per_step = (now - t0) / (step - s0)
        return utcnow() + timedelta(seconds=per_step * (total - step))


def _json_number(value: Any) -> bool:
    return isinstance(value, int | float) and not (isinstance(value, float) and not math.isfinite(value))


def _metrics_message(data: dict[str, Any], step: int, total: int) -> str:
    labels = (("train_loss", "training loss"), ("valid_loss", "validation loss"),
              ("train_reward_mean", "training reward"), ("valid_reward_mean", "validation reward"))
    parts = [f"{label}={data[key]:.4f}" for key, label in labels if key in data]
    return f"Step {step}/{total}: {', '.join(parts) or 'metrics'}"
