"""One attempt of an eval run, from claim to its end: the body of the `run_eval` task.

claim (conditional UPDATE; zero rows: a duplicate or stale message, dropped) -> heartbeat the lease -> the items, as
the run was made (its inline rows, or its file read again) -> skip those an earlier attempt recorded -> per batch of
`max_batch_size` items: the cancel request read, each item's messages rendered from the template, the model's
answers generated in one batched call, every criterion graded over the batch (`grade_batch`: one judge call, one
sandboxed python process), the batch's output items and the run's counters recorded in one fenced transaction ->
`completed`, `canceled` (between two batches; what was graded stays) or `failed` with a code.

A worker that dies mid-run stops renewing its lease; the reaper requeues the run (attempt + 1, capped by
`max_job_restarts`) and the next attempt grades only the items no attempt recorded, so each item is graded once. A
worker shutting down gives the run back the same way at the next batch. Item k is sampled with seed `seed + k`,
whatever batch it falls in, so a resumed run answers as an uninterrupted one would.

The model and the judges load as the run's owner would see them over the API (a base, their fine-tunes and
checkpoints); python criteria run in the engine's sandbox with the data dir denied, only while the operator allows
them.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.core.errors import APIError
from app.core.json_safe import json_safe
from app.db.models import ApiKey, EvalRun
from app.services import dispatch, eval_criteria, eval_items, eval_lifecycle, evals
from app.services.eval_criteria import Criterion
from app.services.eval_items import ItemsError
from app.services.eval_lifecycle import GradedItem
from app.services.graders import sandbox_config
from app.services.lifecycle import LeaseLost
from worker import failures, training
from worker.context import WorkerContext
from worker.failures import JobFailure
from worker.lease import Heartbeat, Lease
from worker.reinforcement import _judge_model
from worker.training import _final_write

if TYPE_CHECKING:
    from unsloth_core.generate import Completion
    from unsloth_core.graders import GradeResult
    from worker.eval_sampling import EvalSampler, SampleRequest

log = logging.getLogger("worker.evaluating")

MAX_LOADED = 2  # the evaluated model and one judge


class EvalLease(Lease):
    """The job lease's heartbeat, renewing an eval run's row instead; `check()` reads the cancel request between
    batches."""

    def renew(self) -> None:
        started = time.monotonic()
        with self.ctx.sessions() as session:
            eval_lifecycle.renew_lease(session=session, run_id=self.job_id, attempt=self.attempt, owner=self.owner,
                                       lease=self.ctx.lease)
        self.expires = started + self.ctx.settings.lease_s

    def check(self) -> str | None:
        """"cancel" when the user asked for it, read now. Raises LeaseLost."""
        self.ensure()
        try:
            with self.ctx.sessions() as session:
                cancel = eval_lifecycle.read_cancel(session=session, run_id=self.job_id, attempt=self.attempt,
                                                    owner=self.owner)
        except LeaseLost:
            self.lost.set()
            raise
        return "cancel" if cancel else None


def run_eval(ctx: WorkerContext, run_id: str, attempt: int, owner: str) -> str:
    """Run one attempt; returns how it ended: dropped, lost, completed, canceled, failed, requeued (the worker is
    shutting down) or unrecorded (the database's disk is full)."""
    with ctx.sessions() as session:
        row = eval_lifecycle.claim_run(session=session, run_id=run_id, attempt=attempt, owner=owner, lease=ctx.lease)
    if row is None:
        log.info("eval run %s attempt %d: not queued with this attempt (a duplicate or stale message); dropped",
                 run_id, attempt)
        return "dropped"
    lease = EvalLease(ctx, run_id, attempt, owner)
    try:
        with Heartbeat(lease, ctx.settings.heartbeat_s):
            return _run_claimed(ctx, row, lease)
    except LeaseLost:
        log.warning("eval run %s attempt %d: lease lost; stopped without writing more", run_id, attempt)
        return "lost"
    except OperationalError as e:
        if not failures.is_storage_full(e):
            raise
        log.error("eval run %s attempt %d: the database's disk is full, so its items could not be recorded; it stays "
                  "in progress until its lease expires, then the reaper requeues it", run_id, attempt)
        return "unrecorded"
    finally:
        if "torch" in sys.modules:  # nothing was loaded otherwise: no reason to import torch here
            from unsloth_core.memory import release_memory

            release_memory()


def _run_claimed(ctx: WorkerContext, row: EvalRun, lease: EvalLease) -> str:
    fence: dict[str, Any] = {"run_id": row.id, "attempt": row.attempt, "owner": lease.owner}
    try:
        ended = grade_run(ctx, row, lease)
    except LeaseLost:
        raise
    except Exception as e:
        failure = classify(e)
        if failure.code in ("internal_error", "storage_error"):
            log.exception("eval run %s attempt %d failed", row.id, row.attempt)
        else:
            log.warning("eval run %s attempt %d failed: %s", row.id, row.attempt, failure)
        status = _final_write(ctx, lease, lambda session: eval_lifecycle.fail_run(
            session=session, code=failure.code, message=failure.message, param=failure.param, **fence))
        return str(status) if status else _lost(lease)
    if ended == "requeued":
        return ended
    status = _final_write(ctx, lease, lambda session: eval_lifecycle.finish_run(session=session, **fence))
    return str(status) if status else _lost(lease)


def _lost(lease: Lease) -> str:
    lease.lost.set()
    raise LeaseLost(lease.job_id)


def grade_run(ctx: WorkerContext, row: EvalRun, lease: EvalLease) -> str:
    """Answer and grade every item no attempt recorded, a batch at a time; "requeued" when the worker is shutting
    down (the run given back), else "done" (all recorded, or a cancel seen). Raises JobFailure and the engine's
    errors."""
    items = _items(ctx, row)
    criteria = eval_criteria.parse(row.testing_criteria)
    with ctx.sessions() as session:
        done = eval_lifecycle.graded_items(session=session, run_id=row.id)
    pending = [i for i in range(len(items)) if i not in done]
    if done:
        log.info("eval run %s attempt %d: %d of %d items recorded by earlier attempts; grading the rest", row.id,
                 row.attempt, len(done), len(items))
    size = ctx.settings.max_batch_size
    sampler = _sampler(ctx, row) if pending else None
    try:
        for start in range(0, len(pending), size):
            if lease.check() == "cancel":
                return "done"
            if training.stopping.is_set():
                return _requeue(ctx, row, lease)
            assert sampler is not None
            graded = answer_and_grade(ctx, row, criteria, sampler, [(i, items[i]) for i in pending[start:start + size]])
            with ctx.sessions() as session:
                if not eval_lifecycle.record_items(session=session, run_id=row.id, attempt=row.attempt,
                                                   owner=lease.owner, items=graded):
                    _lost(lease)
    finally:
        if sampler is not None:
            sampler.close()
    return "done"


def _requeue(ctx: WorkerContext, row: EvalRun, lease: EvalLease) -> str:
    attempt = _final_write(ctx, lease, lambda session: eval_lifecycle.requeue_run(
        session=session, run_id=row.id, attempt=row.attempt, owner=lease.owner))
    if attempt is None:
        return _lost(lease)
    with ctx.sessions() as session:
        dispatch.send_eval(session=session, broker=ctx.broker, run_id=row.id, attempt=attempt)
    log.warning("eval run %s attempt %d: the worker is shutting down; given back as attempt %s", row.id, row.attempt,
                attempt)
    return "requeued"


# ---- what the run reads ----


def _owner(session: Session, row: EvalRun) -> ApiKey:
    key = session.get(ApiKey, row.owner_id)
    if key is None:
        raise JobFailure("api_key_not_found", f"The run's API key {row.owner_id} no longer exists.", None)
    return key


def _items(ctx: WorkerContext, row: EvalRun) -> list[dict[str, Any]]:
    """The data source's items, as the run was made (its file read again: a deleted file fails the run)."""
    with ctx.sessions() as session:
        return evals.load_items(session=session, settings=ctx.settings, key=_owner(session, row),
                                source=row.data_source)


def _sampler(ctx: WorkerContext, row: EvalRun) -> EvalSampler:
    """The model loader and judge for this run: names resolved as the run's owner sees models. Raises JobFailure
    when the evaluated model is no longer theirs to use."""
    import torch

    from app.inference.cache import resolve_device, resolve_dtype
    from worker.eval_sampling import EvalSampler

    try:
        _judge_model(ctx, row.owner_id, row.model)
    except KeyError as e:
        raise JobFailure("model_not_found", f"The model '{row.model}' cannot be evaluated any more: {e.args[0]}",
                         "data_source.model") from None
    if ctx.settings.torch_threads:
        torch.set_num_threads(ctx.settings.torch_threads)
    device = resolve_device(ctx.settings.device)
    return EvalSampler(lambda name: _judge_model(ctx, row.owner_id, name), device=device,
                       dtype=resolve_dtype(ctx.settings.dtype, device), max_loaded=MAX_LOADED)


# ---- one batch ----


def answer_and_grade(ctx: WorkerContext, row: EvalRun, criteria: list[Criterion], sampler: EvalSampler,
                     batch: list[tuple[int, dict[str, Any]]]) -> list[GradedItem]:
    """The batch's items answered by the run's model and graded by every criterion, in order."""
    requests, answers, errors = _answer(ctx, row, sampler, batch)
    answered = [(index, item) for index, item in batch if index in answers]
    grades = _grade(ctx, criteria, sampler, answered, answers)
    out = []
    for index, item in batch:
        completion = answers.get(index)
        passed = {c.id: c.passed(grades[c.id][index]) for c in criteria if index in grades[c.id]}
        results = [_result(c, grades[c.id][index], passed[c.id]) for c in criteria if c.id in passed]
        usage = (completion.prompt_tokens, completion.completion_tokens) if completion else (0, 0)
        sample = _sample(row, requests.get(index), completion, errors.get(index))
        out.append(GradedItem(index=index, item=json_safe(item), sample=json_safe(sample),
                              results=json_safe(results), criteria_passed=passed, usage=usage))
    return out


def _answer(ctx: WorkerContext, row: EvalRun, sampler: EvalSampler, batch: list[tuple[int, dict[str, Any]]]
            ) -> tuple[dict[int, SampleRequest], dict[int, Completion], dict[int, dict[str, str]]]:
    """Each item's request, the model's answers (one batched generation), and why an item got none."""
    requests: dict[int, SampleRequest] = {}
    errors: dict[int, dict[str, str]] = {}
    for index, item in batch:
        try:
            requests[index] = _request(ctx, row, index, item)
        except (LookupError, ValueError) as e:  # a field the item lacks: this item errors, the run goes on
            errors[index] = {"code": "invalid_item", "message": f"The input messages cannot be built: {e}"}
    answers: dict[int, Completion] = {}
    order = list(requests)
    for index, answer in zip(order, sampler.sample(row.model, [requests[i] for i in order])):
        if isinstance(answer, str):
            errors[index] = {"code": "invalid_prompt", "message": f"No answer could be sampled: {answer}"}
        else:
            answers[index] = answer
    return requests, answers, errors


def _grade(ctx: WorkerContext, criteria: list[Criterion], sampler: EvalSampler,
           answered: list[tuple[int, dict[str, Any]]], answers: dict[int, Completion]
           ) -> dict[str, dict[int, GradeResult]]:
    """Every criterion over the answered items (one grade_batch each): criterion id -> item number -> grade."""
    from unsloth_core.graders import Sample, grade_batch

    samples = [Sample.from_text(answers[i].text, finish_reason=answers[i].finish_reason) for i, _ in answered]
    grades = {}
    for criterion in criteria:
        results = grade_batch(criterion.grader, samples, [item for _, item in answered], judge=sampler,
                              allow_python=ctx.settings.allow_python_graders, sandbox=sandbox_config(ctx.settings))
        grades[criterion.id] = dict(zip([i for i, _ in answered], results))
    return grades


def _request(ctx: WorkerContext, row: EvalRun, index: int, item: dict[str, Any]) -> SampleRequest:
    from worker.eval_sampling import SampleRequest

    params = row.data_source.get("sampling_params") or {}
    temperature, top_p = params.get("temperature"), params.get("top_p")
    return SampleRequest(messages=eval_items.messages(row.data_source["input_messages"], item),
                         temperature=1.0 if temperature is None else float(temperature),
                         top_p=1.0 if top_p is None else float(top_p),
                         max_tokens=int(params.get("max_completion_tokens") or ctx.settings.max_tokens),
                         seed=(row.seed + index) % 2**63)


def _sample(row: EvalRun, request: SampleRequest | None, completion: Completion | None,
            error: dict[str, str] | None) -> dict[str, Any]:
    """OpenAI's output item `sample`: what was asked, what came back, how it was sampled."""
    prompt, generated = (completion.prompt_tokens, completion.completion_tokens) if completion else (0, 0)
    return {
        "input": request.messages if request else [],
        "output": [{"role": "assistant", "content": completion.text}] if completion else [],
        "finish_reason": completion.finish_reason if completion else None,
        "model": row.model,
        "usage": {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
                  "cached_tokens": 0},
        "temperature": request.temperature if request else None,
        "top_p": request.top_p if request else None,
        "max_completion_tokens": request.max_tokens if request else None,
        "seed": request.seed if request else None,
        "error": error,
    }


def _result(criterion: Criterion, graded: GradeResult, passed: bool) -> dict[str, Any]:
    """One criterion's result: OpenAI's fields (name is the criterion's id), its error flags as `errors`, and what
    the grader saw (a judge's exchange) as `sample`."""
    return {"name": criterion.id, "type": graded.type, "score": graded.score, "passed": passed,
            "sample": graded.details or None,
            "errors": [{"code": e.code, "message": e.message, "grader": e.grader} for e in graded.errors]}


# ---- failures ----


def classify(error: BaseException) -> JobFailure:
    """The failure to report for an exception raised while running an eval."""
    from unsloth_core.errors import ModelFormatError, UnslothError
    from unsloth_core.graders import GraderError

    if isinstance(error, JobFailure):
        return error
    if isinstance(error, ItemsError):
        return JobFailure(error.code, error.message, error.param)
    if isinstance(error, APIError):  # a lookup the API made at creation, failing now (a file's bytes gone)
        return JobFailure(error.code or "invalid_request", error.message, error.param)
    if isinstance(error, GraderError):  # python graders switched off since the run was made, no sandbox here
        return JobFailure("grader_unavailable", f"A testing criterion cannot run on this server: {error}",
                          "testing_criteria")
    if failures.is_out_of_memory(error):
        where = "GPU" if failures.out_of_gpu_memory(error) else "host"
        return JobFailure("out_of_memory", f"The run ran out of {where} memory generating a batch of answers; an "
                                           f"operator can lower UNSLOTH_MAX_BATCH_SIZE, or give the run a smaller "
                                           f"max_completion_tokens.", "data_source.sampling_params")
    if isinstance(error, ModelFormatError):
        return JobFailure("model_unreadable", f"A model of the run cannot be loaded: {error}", "data_source.model")
    if isinstance(error, UnslothError | ValueError):
        return JobFailure("invalid_request", str(error), None)
    if isinstance(error, OSError):
        return JobFailure("storage_error", f"Reading the run's files failed ({error.strerror or type(error).__name__})"
                                           "; the server's data directory needs attention.", None)
    return JobFailure("internal_error", f"The worker failed with an unexpected error ({type(error).__name__}); "
                                        "the traceback is in the worker's log.", None)
