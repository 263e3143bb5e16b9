"""The tables. Rows are the truth for every object the API shows; a broker message is only a wake-up call.

Ids are server-generated and time-ordered (`app.core.ids`), so "newest first" is `ORDER BY id DESC` and a cursor is
an id. Paths are stored relative to the data dir and never built from user strings.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, utcnow


class JobStatus(StrEnum):
    """A job's status. A `StrEnum`, so the stored strings and the API's JSON are the values themselves; which status
    may follow which is `app.services.transitions`'."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


JOB_STATUSES = tuple(s.value for s in JobStatus)  # plain strings: the CHECK constraint's text
TERMINAL_STATUSES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
FILE_STATUSES = ("uploaded", "processed", "error")
MODEL_KINDS = ("base", "fine_tune", "checkpoint")
STOP_REQUESTS = ("cancel", "pause", "preempt")
# A file's size: 64-bit (an exported GGUF is gigabytes; PostgreSQL's INTEGER stops at 2 GiB). SQLite's INTEGER is
# 64-bit already, and stays as it was created.
FILE_BYTES = BigInteger().with_variant(Integer(), "sqlite")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class ApiKey(Base):
    """A Bearer key: only its SHA-256 is stored; `prefix` is the first characters, shown so people can tell keys
    apart."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    source: Mapped[str] = mapped_column(String(16), default="cli")  # cli | env | embedded
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class File(Base):
    __tablename__ = "files"
    __table_args__ = (
        CheckConstraint(_in("status", FILE_STATUSES), name="status"),
        Index(None, "owner_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    filename: Mapped[str] = mapped_column(String(255))  # the client's name: a label, never a path
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(FILE_BYTES)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text)
    validation: Mapped[dict[str, Any] | None]  # unsloth_core ValidationReport.to_dict(), its errors capped
    # The report without its errors (counts, format, error counts): what a file list returns, so a list never
    # reads every file's whole report (issue 15: 10k files of bad lines made a 1.4 GB list)
    validation_summary: Mapped[dict[str, Any] | None]
    path: Mapped[str] = mapped_column(String(255))  # relative to the data dir
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]


class Job(Base):
    """A fine-tuning job. `attempt` is the fencing token: every (re)queue increments it, the broker message carries
    it, and a worker's claim and every later write match on it (plus `lease_owner`)."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint(f"stop_requested IS NULL OR {_in('stop_requested', STOP_REQUESTS)}", name="stop_requested"),
        UniqueConstraint("owner_id", "idempotency_key"),
        Index(None, "owner_id", "id"),
        Index(None, "owner_id", "request_hash"),
        Index(None, "status", "enqueued_at"),
        Index(None, "status", "resend_at"),
        Index(None, "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(512))  # the base model id
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    method: Mapped[dict[str, Any]]  # resolved: {"type", "<type>": {"hyperparameters": {...}}}, no "auto" left
    integrations: Mapped[list[Any] | None]
    status: Mapped[str] = mapped_column(String(32))
    stop_requested: Mapped[str | None] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    restarts: Mapped[int] = mapped_column(Integer, default=0)  # lease expiries recovered (capped)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    enqueued_at: Mapped[datetime | None]  # last time a train message was sent
    send_count: Mapped[int] = mapped_column(Integer, default=0)  # messages sent for this attempt
    # When the re-send loop may send it again (None: now). Kept as a column so the loop asks the database for the
    # jobs that are due, oldest due first: filtering a page of 100 by back-off in Python starved newer jobs.
    resend_at: Mapped[datetime | None]
    progress: Mapped[dict[str, Any] | None]  # worker-written: step, total_steps, epoch, ...
    last_checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[dict[str, Any] | None]  # {"code", "message", "param"}
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512))
    trained_tokens: Mapped[int | None] = mapped_column(Integer)
    result_files: Mapped[list[Any] | None]
    estimated_finish: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        CheckConstraint(_in("level", ("info", "warn", "error")), name="level"),
        Index(None, "job_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    type: Mapped[str] = mapped_column(String(16), default="message")  # message | metrics
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step_number"), Index(None, "job_id", "id"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    step_number: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]]
    path: Mapped[str] = mapped_column(String(512))  # adapter dir, relative to the data dir
    model_id: Mapped[str] = mapped_column(String(512), unique=True)  # `<fine-tune id>:ckpt-step-<N>`
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRollout(Base):
    """One prompt a reinforcement (GRPO) job sampled at a logged step, with its group of completions and their rewards
    and advantages: `data` is {"prompt", "completions": [...]}, as the engine hands it over, cut to size by
    `lifecycle.record_rollouts` (which also keeps only a job's newest ones)."""

    __tablename__ = "job_rollouts"
    __table_args__ = (Index(None, "job_id", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]]


class Model(Base):
    """Everything `/v1/models` lists: base models (public, `owner_id` NULL), fine-tunes and checkpoints (owned).
    `parent` is the model this one was trained from, `root` the base model underneath."""

    __tablename__ = "models"
    __table_args__ = (CheckConstraint(_in("kind", MODEL_KINDS), name="kind"), Index(None, "owner_id"))

    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"))
    parent: Mapped[str | None] = mapped_column(String(512))
    root: Mapped[str] = mapped_column(String(512))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    checkpoint_id: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))  # model or adapter dir, relative to the data dir
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None]


class ExportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


EXPORT_STATUSES = tuple(s.value for s in ExportStatus)
EXPORT_FORMATS = ("gguf", "merged", "peft")


class Export(Base):
    """An export of a model (a fine-tune, a checkpoint or a base model) to GGUF, a merged Hugging Face directory or a
    PEFT adapter, run by a worker. Its artifacts are `File` rows (purpose `export`), recorded in the transaction that
    marks it succeeded. `attempt` fences the worker's writes as a job's does."""

    __tablename__ = "exports"
    __table_args__ = (
        CheckConstraint(_in("status", EXPORT_STATUSES), name="status"),
        CheckConstraint(_in("format", EXPORT_FORMATS), name="format"),
        UniqueConstraint("owner_id", "idempotency_key"),
        Index(None, "owner_id", "id"),
        Index(None, "owner_id", "request_hash"),
        Index(None, "status", "resend_at"),
        Index(None, "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(512))  # the model id exported, as the request named it
    format: Mapped[str] = mapped_column(String(16))
    quantization: Mapped[str | None] = mapped_column(String(16))  # the GGUF type, or a merged model's dtype
    ollama: Mapped[bool] = mapped_column(default=False)
    status: Mapped[str] = mapped_column(String(16))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    restarts: Mapped[int] = mapped_column(Integer, default=0)  # lease expiries recovered (capped)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    send_count: Mapped[int] = mapped_column(Integer, default=0)  # messages sent for this attempt
    resend_at: Mapped[datetime | None]  # when the re-send loop may send it again
    result_files: Mapped[list[Any] | None]  # file ids: the artifact first, then the Modelfile
    verification: Mapped[dict[str, Any] | None]  # what the read-back check compared and measured
    error: Mapped[dict[str, Any] | None]  # {"code", "message", "param"}
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]


class EvalRunStatus(StrEnum):
    """An eval run's status, spelt as OpenAI's Evals API spells it (`in_progress`, `canceled`)."""

    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


EVAL_RUN_STATUSES = tuple(s.value for s in EvalRunStatus)
OUTPUT_ITEM_STATUSES = ("pass", "fail")


class Eval(Base):
    """An eval (OpenAI's Evals API): the item schema its runs' data must have, and its testing criteria (graders,
    each with the id its results are reported under)."""

    __tablename__ = "evals"
    __table_args__ = (Index(None, "owner_id", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    name: Mapped[str] = mapped_column(String(256))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    data_source_config: Mapped[dict[str, Any]]  # as given: {"type": "custom", "item_schema", "include_sample_schema"}
    testing_criteria: Mapped[list[Any]]  # OpenAI's grader objects, each with its "id"
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class EvalRun(Base):
    """One run of an eval: a model's answers to a data source's items, graded by the eval's criteria (copied here
    when the run is made, so renaming or editing the eval never changes a run). Run by a worker; `attempt` fences its
    writes as a job's does, and a resumed attempt grades only the items no earlier attempt recorded."""

    __tablename__ = "eval_runs"
    __table_args__ = (
        CheckConstraint(_in("status", EVAL_RUN_STATUSES), name="status"),
        Index(None, "eval_id", "id"),
        Index(None, "owner_id", "status"),
        Index(None, "status", "resend_at"),
        Index(None, "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id", ondelete="CASCADE"))
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    name: Mapped[str] = mapped_column(String(256))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata")
    model: Mapped[str] = mapped_column(String(512))  # the model id evaluated, as the request named it
    data_source: Mapped[dict[str, Any]]  # as given (file_content's rows included)
    testing_criteria: Mapped[list[Any]]
    seed: Mapped[int] = mapped_column(BigInteger)  # sampling_params.seed, or one drawn at creation; + item index
    status: Mapped[str] = mapped_column(String(16))
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    restarts: Mapped[int] = mapped_column(Integer, default=0)  # lease expiries recovered (capped)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    send_count: Mapped[int] = mapped_column(Integer, default=0)  # messages sent for this attempt
    resend_at: Mapped[datetime | None]  # when the re-send loop may send it again
    # Counters, updated in the transaction that records each batch's output items (so they always agree)
    result_counts: Mapped[dict[str, Any]]  # {"total", "errored", "failed", "passed"}
    per_testing_criteria_results: Mapped[list[Any]]  # [{"testing_criteria", "passed", "failed"}]
    per_model_usage: Mapped[list[Any]]  # [{"model_name", "invocation_count", "prompt_tokens", ...}]
    error: Mapped[dict[str, Any] | None]  # {"code", "message", "param"}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class EvalOutputItem(Base):
    """One data source item of a run, answered and graded: recorded once (unique per run and item index), in the
    fenced transaction that also counts it."""

    __tablename__ = "eval_output_items"
    __table_args__ = (
        CheckConstraint(_in("status", OUTPUT_ITEM_STATUSES), name="status"),
        UniqueConstraint("run_id", "datasource_item_id"),
        Index(None, "run_id", "id"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    eval_id: Mapped[str] = mapped_column(String(64))
    datasource_item_id: Mapped[int] = mapped_column(Integer)  # the item's index in the data source, from 0
    status: Mapped[str] = mapped_column(String(8))
    datasource_item: Mapped[dict[str, Any]]
    sample: Mapped[dict[str, Any]]  # OpenAI's: input, output, finish_reason, model, usage, sampling values, error
    results: Mapped[list[Any]]  # per criterion: {"name", "type", "score", "passed", "sample", "errors"}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
