"""Fine-tuning jobs: plan (checks + resolved hyperparameters), create (idempotent), list, cancel / pause / resume,
events and checkpoints. The worker side of the lifecycle (claim, checkpoints, finish) is in `lifecycle.py`."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import ids
from app.core.broker import Broker
from app.core.config import Settings
from app.core.errors import APIError, bad_request, not_found
from app.db.base import unix, utcnow
from app.db.models import TERMINAL_STATUSES, ApiKey, Checkpoint, File, Job, JobEvent, JobStatus, Model
from app.schemas.jobs import (
    ALL_LINEAR_MODULES,
    AnyHyperparameters,
    CheckpointList,
    CheckpointObject,
    DPOHyperparameters,
    FineTuningJob,
    JobCreate,
    JobError,
    JobEventList,
    JobEventObject,
    JobList,
    JobValidation,
    ReinforcementHyperparameters,
    SupervisedHyperparameters,
    ValidationIssue,
)
from app.services import hyperparameters, storage
from app.services.common import by_idempotency_key, owned, page
from app.services.dispatch import send_train
from app.services.files import readable_content
from app.services.job_events import new_event
from app.services.models import context_length, resolve_servable
from app.services.storage import base_model_dir
from app.services.transitions import move, next_attempt
from unsloth_core.graders import GraderValidationError

ORGANIZATION = "org-unsloth"
MAX_LINE_ISSUES = 100  # per file, in a dry-run answer


@dataclass
class JobPlan:
    """What a create body amounts to, once checked: the base model, the files and every hyperparameter resolved."""

    model: str
    method_type: str = "supervised"
    grader: dict[str, Any] | None = None  # a reinforcement job's, as OpenAI's JSON (validated)
    judge_models: list[str] = field(default_factory=list)  # the models its model graders name
    allow_python_graders: bool = False
    parent_lora: dict[str, Any] | None = None  # a continued fine-tune's adapter shape (r, alpha, targets)
    eval_graders: list[dict[str, Any]] = field(default_factory=list)  # a supervised/DPO job's, validated
    base_path: Path | None = None
    training: File | None = None
    validation: File | None = None
    hyperparameters: dict[str, Any] | None = None
    issues: list[ValidationIssue] = field(default_factory=list)

    def fail(self, param: str | None, code: str, message: str, line: int | None = None) -> None:
        self.issues.append(ValidationIssue(param=param, code=code, message=message, line=line))

    @property
    def method(self) -> dict[str, Any]:
        body: dict[str, Any] = {"hyperparameters": self.hyperparameters}
        if self.grader is not None:
            body = {"grader": self.grader, **body}
        return {"type": self.method_type, self.method_type: body}

    @property
    def data_purpose(self) -> str:
        """What the files must hold: the engine's data purpose for this method."""
        return {"dpo": "dpo", "reinforcement": "rl"}.get(self.method_type, "sft")


def request_hash(payload: JobCreate) -> str:
    canonical = json.dumps(payload.model_dump(mode="json", exclude_unset=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---- planning (shared by create and the dry-run) ----


def _method_hyperparameters(payload: JobCreate, plan: JobPlan) -> AnyHyperparameters:
    method = payload.method
    legacy = payload.hyperparameters
    if method is None:
        plan.method_type = "supervised"
        return SupervisedHyperparameters(**(legacy.model_dump(exclude_unset=True) if legacy else {}))
    plan.method_type = method.type
    if method.type in ("dpo", "reinforcement") and legacy is not None:
        plan.fail("hyperparameters", "invalid_value", f"Give {method.type} hyperparameters under "
                                                      f"method.{method.type}.hyperparameters, not the deprecated "
                                                      "top-level 'hyperparameters'.")
    if method.type == "reinforcement":
        if method.reinforcement is None:
            plan.fail("method.reinforcement", "missing_required_parameter", "A reinforcement job needs "
                                                                            "method.reinforcement.grader.")
            return ReinforcementHyperparameters()
        plan.grader, plan.judge_models = _check_grader(plan, method.reinforcement.grader,
                                                       "method.reinforcement.grader")
        return method.reinforcement.hyperparameters
    if method.type == "dpo":
        return method.dpo.hyperparameters if method.dpo else DPOHyperparameters()
    hp = method.supervised.hyperparameters if method.supervised else SupervisedHyperparameters()
    if legacy is not None:  # the deprecated top-level field fills what `method` leaves unset
        merged = {**legacy.model_dump(exclude_unset=True), **hp.model_dump(exclude_unset=True)}
        hp = SupervisedHyperparameters(**merged)
    return hp


def _check_grader(plan: JobPlan, grader: dict[str, Any], param: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The grader's JSON is one (each problem named by its path), and this server can run it. Returns it as
    validated (None when it is not one) and the judge models it names."""
    from unsloth_core.graders import requirements, validate_grader

    try:
        checked = validate_grader(grader)
    except GraderValidationError as e:
        plan.fail(_grader_param(param, e), "invalid_grader", f"The grader is not valid: {e}")
        return None, []
    needs = requirements(checked)
    if needs.python and not plan.allow_python_graders:
        plan.fail(param, "python_graders_disabled", "This server does not run python graders; its operator can "
                                                    "enable them with UNSLOTH_ALLOW_PYTHON_GRADERS=true.")
    if needs.embed:
        plan.fail(param, "grader_not_supported", "text_similarity's 'cosine' needs an embedding model, which this "
                                                 "server does not serve; use another evaluation_metric.")
    return checked.to_openai(), list(needs.judge_models)


def _grader_param(base: str, error: GraderValidationError) -> str:
    return f"{base}.{error.param}" if error.param else base


def _check_file(plan: JobPlan, *, session: Session, key: ApiKey, file_id: str, param: str,
                wanted: str) -> File | None:
    row = session.scalar(owned(select(File).where(File.id == file_id, File.deleted_at.is_(None)), File.owner_id, key))
    if row is None:
        plan.fail(param, "file_not_found", f"No file found with id '{file_id}'.")
        return None
    if row.purpose != "fine-tune":
        plan.fail(param, "invalid_file_purpose", f"File {file_id} has purpose '{row.purpose}'; upload it with "
                                                 "purpose 'fine-tune'.")
        return None
    report = row.validation or {}
    if row.status == "error":
        plan.fail(param, f"invalid_{param}", f"File {file_id} is not valid: {row.status_details}")
        return row
    if report.get("purpose") not in (None, wanted):
        plan.fail(param, "wrong_purpose", f"File {file_id} holds {report.get('format')} data, for "
                                          f"{str(report.get('purpose')).upper()}; a {plan.method_type} job needs "
                                          f"{wanted.upper()} data.")
    return row


def plan_job(*, session: Session, settings: Settings, key: ApiKey, payload: JobCreate) -> JobPlan:
    plan = JobPlan(model=payload.model, allow_python_graders=settings.allow_python_graders)
    hp = _method_hyperparameters(payload, plan)
    hp_param = f"method.{plan.method_type}.hyperparameters"
    plan.base_path = base_model_dir(settings, payload.model)
    if plan.base_path is None:
        _continued_model(plan, session, settings, key, payload.model)
    wanted = plan.data_purpose
    plan.training = _check_file(plan, session=session, key=key, file_id=payload.training_file,
                                param="training_file", wanted=wanted)
    if payload.validation_file:
        plan.validation = _check_file(plan, session=session, key=key, file_id=payload.validation_file,
                                      param="validation_file", wanted=wanted)
    ctx = context_length(plan.base_path) if plan.base_path else None
    if hp.lora_r != "auto" and hp.lora_r > settings.max_lora_rank:
        plan.fail(f"{hp_param}.lora_r", "invalid_value", f"lora_r must be at most {settings.max_lora_rank} (the "
                                                          "largest rank this server serves).")
    if hp.max_seq_length != "auto" and ctx is not None and hp.max_seq_length > ctx:
        plan.fail(f"{hp_param}.max_seq_length", "invalid_value", f"max_seq_length must be at most {ctx}, the "
                                                                  f"context length of {payload.model}.")
    if plan.grader is not None:
        _check_judges(plan, session, settings, key, plan.judge_models, "method.reinforcement.grader")
        for param, row in (("training_file", plan.training), ("validation_file", plan.validation)):
            if row is not None and row.status != "error":
                _check_grader_fields(plan, settings, row, param, plan.grader)
    eval_graders = getattr(hp, "eval_graders", None)
    if eval_graders:
        _check_eval_graders(plan, session, settings, key, eval_graders, f"{hp_param}.eval_graders")
    n_examples = int((plan.training.validation or {}).get("n_examples") or 0) if plan.training else 0
    plan.hyperparameters = hyperparameters.resolve(hp, method_type=plan.method_type, n_examples=n_examples,
                                                   context_length=ctx)
    if plan.eval_graders:
        plan.hyperparameters["eval_graders"] = plan.eval_graders
    if plan.parent_lora is not None:
        _inherit_lora(plan, hp, hp_param)
    return plan


def _continued_model(plan: JobPlan, session: Session, settings: Settings, key: ApiKey, model_id: str) -> None:
    """A fine-tune or checkpoint of this key's as the job's model: trained on from its adapter, on its base."""
    from unsloth_core.errors import ModelFormatError
    from unsloth_core.lora import read_adapter_config

    row = session.scalar(select(Model).where(Model.id == model_id, Model.deleted_at.is_(None),
                                             Model.kind != "base", Model.owner_id == key.id))
    adapter = storage.adapter_dir(settings, row.path) if row is not None else None
    plan.base_path = base_model_dir(settings, row.root) if row is not None else None
    if row is None or adapter is None or plan.base_path is None:
        plan.fail("model", "model_not_found", f"The model '{model_id}' does not exist or is not available for "
                                              "fine-tuning.")
        plan.base_path = None
        return
    try:
        config = read_adapter_config(adapter)
    except ModelFormatError as e:
        plan.fail("model", "model_unreadable", f"The adapter of '{model_id}' cannot be read: {e}")
        return
    plan.parent_lora = {"lora_r": config.r, "lora_alpha": config.lora_alpha,
                        "lora_target_modules": list(config.target_modules)}


def _inherit_lora(plan: JobPlan, hp: AnyHyperparameters, hp_param: str) -> None:
    """A continued fine-tune keeps its adapter's shape: rank and targets as the parent's ("auto": the parent's;
    anything else is a 400 naming the field), and its alpha unless one is given."""
    assert plan.parent_lora is not None and plan.hyperparameters is not None
    parent = plan.parent_lora
    asked_targets = hp.lora_target_modules
    asked = {"lora_r": hp.lora_r,
             "lora_target_modules": list(ALL_LINEAR_MODULES) if asked_targets == "all-linear" else asked_targets}
    for name, value in asked.items():
        same = sorted(value) == sorted(parent[name]) if isinstance(value, list) else value == parent[name]
        if value != "auto" and not same:
            plan.fail(f"{hp_param}.{name}", "invalid_value", f"{name} must be the continued model's "
                                                             f"({parent[name]}): its adapter is trained further.")
        plan.hyperparameters[name] = parent[name]
    if hp.lora_alpha == "auto":
        plan.hyperparameters["lora_alpha"] = parent["lora_alpha"]


def _check_judges(plan: JobPlan, session: Session, settings: Settings, key: ApiKey, judges: list[str],
                  param: str) -> None:
    """Each judge a model grader names is a model this key may use on this server."""
    for name in judges:
        try:
            resolve_servable(session=session, settings=settings, key=key, model_id=name)
        except APIError as e:
            plan.fail(param, "model_not_found", f"The grader's judge model '{name}' cannot be used: {e.message}")


def _check_eval_graders(plan: JobPlan, session: Session, settings: Settings, key: ApiKey,
                        graders: list[dict[str, Any]], param: str) -> None:
    """A supervised or DPO job's evaluation graders: each valid and runnable here, a validation file to run them on,
    holding the fields they read."""
    if plan.validation is None:
        plan.fail(param, "invalid_value", "eval_graders score answers to validation prompts: give a "
                                          "validation_file.")
    checked: list[dict[str, Any]] = []
    for i, grader in enumerate(graders):
        valid, judges = _check_grader(plan, grader, f"{param}[{i}]")
        if valid is not None:
            checked.append(valid)
            _check_judges(plan, session, settings, key, judges, f"{param}[{i}]")
            if plan.validation is not None and plan.validation.status != "error":
                _check_grader_fields(plan, settings, plan.validation, "validation_file", valid)
    names = [g.get("name") or g["type"] for g in checked]
    if len(set(names)) != len(names):
        plan.fail(param, "invalid_value", "eval_graders need distinct names: each is reported as "
                                          "eval_rewards/<name>/mean.")
    plan.eval_graders = checked


def _check_grader_fields(plan: JobPlan, settings: Settings, row: File, param: str, grader: dict[str, Any]) -> None:
    """Every line holds every `item.` field the grader reads (the first MAX_LINE_ISSUES lines that do not are
    named)."""
    from unsloth_core.graders.dataset import missing_fields_by_line

    for count, (line, missing) in enumerate(missing_fields_by_line(readable_content(settings, row, param),
                                                                   grader)):
        if count == MAX_LINE_ISSUES:
            break
        plan.fail(param, "missing_grader_field", f"Line {line} of {row.id} has no {', '.join(missing)}, which the "
                                                 "grader reads.", line)


def _raise_first(plan: JobPlan) -> None:
    if plan.issues:
        issue = plan.issues[0]
        raise APIError(400, issue.message, param=issue.param, code=issue.code)


# ---- create ----


def _check_active_jobs(session: Session, settings: Settings, key: ApiKey) -> None:
    """One key's queued, running and paused jobs are capped (`max_active_jobs_per_key`): 429 past it."""
    active = session.scalar(select(func.count()).select_from(Job).where(
        Job.owner_id == key.id, Job.status.not_in(TERMINAL_STATUSES))) or 0
    if active >= settings.max_active_jobs_per_key:
        raise APIError(429, f"This API key has {active} fine-tuning jobs queued, running or paused, its limit; "
                            "wait for some to finish or cancel some.", type="rate_limit_error",
                       code="too_many_active_jobs", headers={"Retry-After": "60"})


def create_job(*, session: Session, settings: Settings, broker: Broker, key: ApiKey, payload: JobCreate,
               idempotency_key: str | None, retry_count: int | None) -> Job:
    """Create and enqueue a job, or return the one an earlier identical request made.

    With an `Idempotency-Key`: the same key returns the first job (a different body is 422). Without one: a request
    that is a retry (the SDK's `x-stainless-retry-count` > 0, or a client that sends no such header) returns a job
    made from the same body by the same key within `idempotency_window_s`.
    """
    digest = request_hash(payload)
    if idempotency_key is not None:
        existing = by_idempotency_key(session, Job, key, idempotency_key, digest)
        if existing is not None:
            return existing
    elif retry_count != 0 and settings.idempotency_window_s > 0:
        since = utcnow() - timedelta(seconds=settings.idempotency_window_s)
        existing = session.scalar(select(Job).where(Job.owner_id == key.id, Job.request_hash == digest,
                                                    Job.idempotency_key.is_(None), Job.created_at >= since)
                                  .order_by(Job.id.desc()).limit(1))
        if existing is not None:
            return existing
    _check_active_jobs(session, settings, key)
    plan = plan_job(session=session, settings=settings, key=key, payload=payload)
    _raise_first(plan)
    assert plan.training is not None and plan.hyperparameters is not None
    n_examples = int((plan.training.validation or {}).get("n_examples") or 0)
    total_steps = hyperparameters.estimate_steps(plan.hyperparameters, n_examples=n_examples, n_tokens=None)
    job = Job(id=ids.new_id(ids.JOB), owner_id=key.id, model=payload.model, training_file=payload.training_file,
              validation_file=payload.validation_file, suffix=payload.suffix,
              seed=payload.seed if payload.seed is not None else secrets.randbelow(2**31),
              meta=payload.metadata, method=plan.method,
              integrations=[i.model_dump(mode="json") for i in payload.integrations] if payload.integrations else None,
              status=JobStatus.QUEUED, idempotency_key=idempotency_key, request_hash=digest, result_files=[],
              progress={"step": 0, "total_steps": total_steps})
    session.add(job)
    session.add(new_event(job.id, f"Created fine-tuning job: {job.id}"))
    session.add(new_event(job.id, "Files validated, moving job to queued state"))
    try:
        session.commit()
    except IntegrityError:  # a concurrent request with the same Idempotency-Key won the insert
        session.rollback()
        assert idempotency_key is not None
        existing = by_idempotency_key(session, Job, key, idempotency_key, digest)
        if existing is None:
            raise
        return existing
    send_train(session=session, broker=broker, job_id=job.id, attempt=job.attempt)
    return job


def validate_job(*, session: Session, settings: Settings, key: ApiKey, payload: JobCreate) -> JobValidation:
    """The dry-run: every problem a create would meet, each file re-read with the base model's tokenizer (token
    counts, truncation at the resolved max_seq_length), and the resolved hyperparameters and step estimate."""
    plan = plan_job(session=session, settings=settings, key=key, payload=payload)
    reports: dict[str, dict[str, Any]] = {}
    tokenizer = _load_tokenizer(plan)
    assert plan.hyperparameters is not None
    max_len = plan.hyperparameters["max_seq_length"]
    for param, row in (("training_file", plan.training), ("validation_file", plan.validation)):
        if row is None:
            continue
        report = _measure(settings, row, tokenizer, max_len, plan.data_purpose, param)
        reports[param] = report
        if row.status == "error" or not report["ok"]:
            for err in report["errors"][:MAX_LINE_ISSUES]:
                plan.fail(param, err["code"], err["message"], err["line"])
    training = reports.get("training_file")
    hp = plan.hyperparameters
    steps = trained = None
    if training is not None:
        steps = hyperparameters.estimate_steps(hp, n_examples=int(training["n_examples"]),
                                               n_tokens=training.get("n_tokens"))
        if training.get("n_tokens") is not None:
            trained = int(training["n_tokens"]) * hp["n_epochs"]
    return JobValidation(valid=not plan.issues, errors=plan.issues, model=payload.model,
                         training_file=training, validation_file=reports.get("validation_file"), method=plan.method,
                         hyperparameters=_legacy_view(hp), n_examples=training["n_examples"] if training else None,
                         n_tokens=training.get("n_tokens") if training else None,
                         n_truncated=training.get("n_truncated") if training else None,
                         estimated_steps=steps, estimated_trained_tokens=trained)


def _load_tokenizer(plan: JobPlan) -> Any:
    if plan.base_path is None:
        return None
    from unsloth_core.errors import UnslothError
    from unsloth_core.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(plan.base_path)
    except UnslothError as e:
        plan.fail("model", "model_unreadable", f"Cannot read the tokenizer of {plan.model}: {e}")
        return None


def _measure(settings: Settings, row: File, tokenizer: Any, max_len: int, purpose: str,
             param: str) -> dict[str, Any]:
    from unsloth_core.data import validate_file

    report = validate_file(readable_content(settings, row, param), tokenizer, max_len if tokenizer else None,
                           purpose=purpose)  # type: ignore[arg-type]
    result: dict[str, Any] = report.to_dict()
    result["id"] = row.id
    return result


# ---- reading ----


def get_job(*, session: Session, key: ApiKey, job_id: str) -> Job:
    row = session.scalar(owned(select(Job).where(Job.id == job_id), Job.owner_id, key))
    if row is None:
        raise not_found("fine-tuning job", job_id, code="job_not_found")
    return row


def list_jobs(*, session: Session, key: ApiKey, after: str | None, limit: int,
              metadata: dict[str, str]) -> JobList:
    query = owned(select(Job), Job.owner_id, key)
    rows, more = page(session, query, Job.id, after=after, limit=limit if not metadata else 10_000)
    if metadata:  # JSON filtering differs by database; metadata is at most 16 short pairs, so filter here
        rows = [r for r in rows if all((r.meta or {}).get(k) == v for k, v in metadata.items())]
        more = len(rows) > limit
        rows = rows[:limit]
    return JobList(data=[job_object(r) for r in rows], has_more=more)


def list_events(*, session: Session, job: Job, after: str | None, limit: int) -> JobEventList:
    rows, more = page(session, select(JobEvent).where(JobEvent.job_id == job.id), JobEvent.id, after=after,
                      limit=limit)
    return JobEventList(data=[event_object(r) for r in rows], has_more=more)


def events_since(*, session: Session, job_id: str, since_ms: int) -> list[JobEvent]:
    """Events from `since_ms` on, oldest first (for the live stream)."""
    query = (select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id >= ids.id_floor(ids.EVENT, since_ms))
             .order_by(JobEvent.id))
    return list(session.scalars(query))


def list_checkpoints(*, session: Session, job: Job, after: str | None, limit: int) -> CheckpointList:
    rows, more = page(session, select(Checkpoint).where(Checkpoint.job_id == job.id), Checkpoint.id, after=after,
                      limit=limit)
    data = [checkpoint_object(r) for r in rows]
    return CheckpointList(data=data, has_more=more, first_id=data[0].id if data else None,
                          last_id=data[-1].id if data else None)


def jobs_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: int(n) for status, n in rows}


# ---- cancel / pause / resume ----


def cancel_job(*, session: Session, key: ApiKey, job_id: str) -> Job:
    return _settle(session, key, job_id, _cancel)


def pause_job(*, session: Session, key: ApiKey, job_id: str) -> Job:
    return _settle(session, key, job_id, _pause)


def _settle(session: Session, key: ApiKey, job_id: str, step: Callable[[Session, Job], bool]) -> Job:
    """Read the job and take `step` on it, committed. A worker's claim (or another request) can change the row
    between the read and the write; the step's compare-and-set then fails, and it is decided again on a new read."""
    for _ in range(3):
        job = get_job(session=session, key=key, job_id=job_id)
        if step(session, job):
            session.commit()
            session.refresh(job)
            return job
        session.rollback()
    raise _busy(job_id)


def _cancel(session: Session, job: Job) -> bool:
    if job.status == JobStatus.CANCELLED:
        return True
    if job.status in TERMINAL_STATUSES:
        raise bad_request(f"Job {job.id} has already {job.status}; it cannot be cancelled.",
                          code="job_not_cancellable")
    if job.status == JobStatus.RUNNING:
        _ask_worker(session, job, "cancel", "Cancellation requested; the job stops at the next step")
        return True
    return move(session, job.id, source=job.status, to=JobStatus.CANCELLED, message="Fine-tuning job cancelled",
                attempt=job.attempt, fence=[Job.attempt == job.attempt],
                values={"stop_requested": None, "finished_at": utcnow()})


def _pause(session: Session, job: Job) -> bool:
    if job.status == JobStatus.PAUSED:
        return True
    if job.status == JobStatus.RUNNING:
        if job.stop_requested == "cancel":
            raise bad_request(f"Job {job.id} is being cancelled; it cannot be paused.", code="job_not_pausable")
        _ask_worker(session, job, "pause", "Pause requested; the job saves a checkpoint and pauses")
        return True
    if job.status != JobStatus.QUEUED:
        raise bad_request(f"Job {job.id} is {job.status}; only a queued or running job can be paused.",
                          code="job_not_pausable")
    return move(session, job.id, source=job.status, to=JobStatus.PAUSED, message="Fine-tuning job paused",
                attempt=job.attempt, fence=[Job.attempt == job.attempt])


def _ask_worker(session: Session, job: Job, request: str, message: str) -> None:
    """A running job is stopped by its worker, between two steps: the request is only written down."""
    if job.stop_requested != request:
        session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING)
                        .values(stop_requested=request))
        session.add(new_event(job.id, message))


def _busy(job_id: str) -> APIError:
    return APIError(409, f"Job {job_id} is changing state; try again.", code="job_busy",
                    headers={"x-should-retry": "true"})


def resume_job(*, session: Session, broker: Broker, key: ApiKey, job_id: str) -> Job:
    job = get_job(session=session, key=key, job_id=job_id)
    if job.status == JobStatus.RUNNING and job.stop_requested == "pause":
        session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING,
                                          Job.stop_requested == "pause").values(stop_requested=None))
        session.add(new_event(job.id, "Pause withdrawn; the job keeps running"))
        session.commit()
        session.refresh(job)
        return job
    if job.status != JobStatus.PAUSED:
        raise bad_request(f"Job {job_id} is {job.status}; only a paused job can be resumed.", code="job_not_paused")
    # A new attempt: a message still in the queue for the old one can no longer claim the job.
    if not move(session, job.id, source=job.status, to=JobStatus.QUEUED, attempt=job.attempt + 1,
                message="Fine-tuning job resumed; queued to continue from its last checkpoint",
                fence=[Job.attempt == job.attempt], values=next_attempt(job.attempt)):
        session.rollback()
        raise _busy(job_id)
    session.commit()
    session.refresh(job)
    send_train(session=session, broker=broker, job_id=job.id, attempt=job.attempt)
    return job


# ---- objects ----


def _legacy_view(hp: dict[str, Any] | None) -> dict[str, Any]:
    hp = hp or {}
    return {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier") if k in hp}


def job_object(row: Job) -> FineTuningJob:
    hp = (row.method.get(row.method["type"]) or {}).get("hyperparameters") if row.method else None
    return FineTuningJob(
        id=row.id, created_at=unix(row.created_at) or 0, model=row.model, organization_id=ORGANIZATION,
        status=row.status, error=JobError(**row.error) if row.error else None, fine_tuned_model=row.fine_tuned_model,
        finished_at=unix(row.finished_at), estimated_finish=unix(row.estimated_finish),
        trained_tokens=row.trained_tokens, training_file=row.training_file, validation_file=row.validation_file,
        result_files=list(row.result_files or []), seed=row.seed, hyperparameters=_legacy_view(hp),
        method=row.method, integrations=row.integrations, metadata=row.meta, suffix=row.suffix,
        stop_requested=row.stop_requested, progress=row.progress)


def event_object(row: JobEvent) -> JobEventObject:
    return JobEventObject(id=row.id, created_at=unix(row.created_at) or 0, level=row.level, message=row.message,
                          type=row.type, data=row.data)


def checkpoint_object(row: Checkpoint) -> CheckpointObject:
    """The probe prompts' answers are kept with the metrics in the row and returned beside them (`samples`)."""
    metrics = {k: v for k, v in (row.metrics or {}).items() if k != "samples"}
    return CheckpointObject(id=row.id, created_at=unix(row.created_at) or 0, fine_tuned_model_checkpoint=row.model_id,
                            fine_tuning_job_id=row.job_id, step_number=row.step_number, metrics=metrics,
                            samples=(row.metrics or {}).get("samples"))
