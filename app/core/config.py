"""Settings: one pydantic-settings class read from `UNSLOTH_*` environment variables (and `.env`), shared by the API,
the worker and the `unsloth keys` command. `load_settings()` turns any problem into one line a person can act on."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

ENV_PREFIX = "UNSLOTH_"
BROKER_SCHEMES = ("redis", "rediss", "amqp", "amqps", "pyamqp", "sqla+sqlite", "sqla+postgresql",
                  "sqla+postgresql+psycopg", "memory")


class SettingsError(Exception):
    """A setting that cannot work; the message is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", env_ignore_empty=True, extra="ignore")

    data_dir: Path = Path("./data")
    database_url: str = ""  # empty: SQLite in the data dir
    broker_url: str = ""  # empty: the embedded SQLAlchemy transport on SQLite in the data dir
    broker_transport_options: dict[str, Any] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = None
    auto_migrate: bool | None = None  # None: migrate at start on SQLite only (compose runs a `migrate` service)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # ---- limits ----
    max_upload_bytes: int = Field(512 * 2**20, ge=1)
    # Per API key, so one key cannot fill the service for the others (429 insufficient_quota / too_many_active_jobs)
    max_files_per_key: int = Field(10_000, ge=1)
    max_file_bytes_per_key: int = Field(100 * 2**30, ge=1)
    max_active_jobs_per_key: int = Field(100, ge=1)  # queued, running or paused
    max_active_exports_per_key: int = Field(4, ge=1)  # queued or running (429 too_many_active_exports)
    max_exports_per_key: int = Field(100, ge=1)  # kept (not deleted), whatever their status (429 insufficient_quota)
    max_active_eval_runs_per_key: int = Field(4, ge=1)  # queued or in progress (429 too_many_active_eval_runs)
    max_eval_items: int = Field(10_000, ge=1)  # data source items per eval run (a file's lines, or file_content)
    # Requests per API key per window (a minute), per route family (0: none); past one, 429 rate_limit_exceeded.
    # Far above what a person or a polling script sends, and 6x or more what the project's fuzzers and CI load test
    # sent with one key in their busiest minute on 2 cores (files 354, fine_tuning 1749, models 94, completions 684):
    # they stop a runaway loop from keeping the API for itself, not a team's work.
    rpm_files: int = Field(3000, ge=0)
    rpm_fine_tuning: int = Field(12000, ge=0)  # job creates, polls, events, checkpoints
    rpm_models: int = Field(6000, ge=0)
    rpm_completions: int = Field(6000, ge=0)  # completions and chat completions together
    # Requests one key has handled at once (app.core.fair_share); the rest wait their turn, up to the queue, then 429
    max_requests_in_flight_per_key: int = Field(2, ge=1)
    max_queued_requests_per_key: int = Field(256, ge=1)
    rate_limit_window_s: float = Field(60.0, gt=0)  # the window the RPM_* limits count in (tests shorten it)
    upload_idle_timeout_s: float = Field(60.0, gt=0)  # an upload that sends nothing for this long is cut off: 408
    max_file_lines: int = Field(1_000_000, ge=1)
    max_request_bytes: int = Field(16 * 2**20, ge=1024)
    max_tokens: int = Field(4096, ge=1)  # per completion choice
    max_n: int = Field(16, ge=1)
    max_concurrent_generations: int = Field(32, ge=1)  # API calls generating at once, over every model
    # Of those, what one API key may hold (None: three quarters), so one busy key never leaves the others none
    max_generations_per_key: int | None = Field(None, ge=1)
    # Sequences one model decodes together (continuous batching). As many as may generate at once: an admitted
    # request that waits for a row only adds to its time to first token (p50 297 -> 86 ms at 32 clients, tests.load).
    max_batch_size: int = Field(32, ge=1)
    # Threads that tokenize prompts and render chat templates, off the event loop (a 4 MB prompt took 3 s there)
    tokenizer_threads: int = Field(2, ge=1)
    retry_after_s: int = Field(1, ge=1)
    max_loaded_base_models: int = Field(2, ge=1)
    max_loaded_adapters: int = Field(16, ge=1)
    max_lora_rank: int = Field(256, ge=1)
    max_job_restarts: int = Field(3, ge=0)  # crash recoveries before a job fails

    # ---- probes ----
    probe_cache_s: float = Field(2.0, ge=0)  # /ready and /metrics' database and broker reads reused this long
    # When set, /metrics answers only `Authorization: Bearer <this>` (Prometheus' `authorization` scrape setting);
    # a static token, not an API key, so metrics still answer while the database is down
    metrics_token: SecretStr | None = None

    # ---- inference ----
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    # The served decode step compiled at static shapes (CUDA graphs on a GPU): auto = on a GPU only, where it made
    # one Llama-1B stream ~10x faster; on the CPU it did not pay (bench/RESULTS.md). The first decode compiles.
    compile_decode: Literal["auto", "on", "off"] = "auto"

    # ---- graders ----
    # python graders run code from whoever holds a key: off unless an operator turns them on. They then run in a
    # sandbox (unsloth_core.graders.sandbox) with no network, no secrets and no data dir; "strict" refuses to run
    # them where Linux namespaces cannot be made, "best_effort" falls back to the weaker audit-hook mode.
    allow_python_graders: bool = False
    python_grader_isolation: Literal["strict", "best_effort"] = "strict"
    python_grader_seconds: float = Field(10.0, gt=0)  # wall-clock time per graded sample
    python_grader_memory_bytes: int = Field(2 * 1024**3, ge=64 * 1024**2)  # address space, as OpenAI's 2 GB

    # ---- jobs ----
    idempotency_window_s: float = Field(600.0, ge=0)
    resend_after_s: float = Field(120.0, gt=0)  # a queued job unclaimed this long gets its message again
    resend_max_interval_s: float = Field(3600.0, gt=0)  # backoff cap between re-sends of one job
    event_poll_interval_s: float = Field(0.5, gt=0)

    # ---- workers ----
    torch_threads: int | None = Field(None, ge=1)  # CPU threads per process; None: torch's default (`serve` splits)
    lease_s: float = Field(90.0, gt=0)  # a worker's hold on a running job; expired leases are requeued
    heartbeat_s: float = Field(15.0, gt=0)  # lease renewal interval (well under lease_s)
    reaper_interval_s: float = Field(30.0, gt=0)  # how often expired leases and unclaimed jobs are looked for
    metrics_every_steps: int = Field(10, ge=1)  # a metrics event (and progress update) every N optimizer steps
    max_job_s: float = Field(24 * 3600.0, gt=0)  # the longest job; the broker's visibility timeout is above it
    shutdown_grace_s: float = Field(60.0, gt=0)  # SIGTERM: time to checkpoint and requeue before exiting
    default_model: str = "smollm2-135m-instruct"  # `unsloth serve` imports it the first time; empty: don't

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, v: str) -> str:
        if not v:
            return v
        if v.startswith("postgres://"):
            v = "postgresql://" + v.removeprefix("postgres://")
        try:
            url = make_url(v)
        except ArgumentError:
            raise ValueError(f"{v!r} is not a database URL (postgresql://user@host/db, sqlite:///path)") from None
        backend = url.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"database {backend!r} is not supported; use postgresql:// or sqlite://")
        if backend == "postgresql" and url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        return url.render_as_string(hide_password=False)

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, v: str) -> str:
        if v and v.split("://", 1)[0] not in BROKER_SCHEMES:
            raise ValueError(f"{v!r} is not a broker URL; use redis://host:6379/0 (or sqla+sqlite:///path)")
        return v

    @field_validator("broker_transport_options", mode="before")
    @classmethod
    def _parse_options(cls, v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.heartbeat_s >= self.lease_s:
            raise ValueError(f"{ENV_PREFIX}HEARTBEAT_S ({self.heartbeat_s}) must be shorter than {ENV_PREFIX}LEASE_S "
                             f"({self.lease_s})")
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'unsloth.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        return self

    # ---- derived ----

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def embedded(self) -> bool:
        """One machine, no other service: SQLite and the SQLAlchemy broker transport (what `make serve` runs)."""
        return self.is_sqlite and self.broker_url.startswith("sqla+")

    @property
    def should_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate

    @cached_property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @cached_property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @cached_property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @cached_property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @cached_property
    def api_key_file(self) -> Path:
        return self.data_dir / "api_key"

    @property
    def visibility_timeout_s(self) -> int:
        """How long the broker (Redis) waits before redelivering an unacknowledged message: above the longest job,
        so a running job is never handed to a second worker by the broker (the lease and reaper recover dead ones)."""
        return int(self.max_job_s + 3600)

    def prepare_dirs(self) -> None:
        """Create the data dir (its parent must exist: a typo should not grow a tree) and its subdirectories."""
        if not self.data_dir.is_dir():
            if not self.data_dir.parent.is_dir():
                raise SettingsError(f"{ENV_PREFIX}DATA_DIR={self.data_dir}: its parent directory does not exist")
            try:
                self.data_dir.mkdir()
            except OSError as e:
                raise SettingsError(f"{ENV_PREFIX}DATA_DIR={self.data_dir}: cannot create it ({e.strerror})") from None
        for d in (self.models_dir, self.files_dir, self.jobs_dir, self.exports_dir):
            try:
                d.mkdir(exist_ok=True)
            except OSError as e:
                message = f"{ENV_PREFIX}DATA_DIR={self.data_dir}: cannot write to it ({e.strerror})"
                raise SettingsError(message) from None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (keyword overrides win); raises SettingsError with one line on any problem."""
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        message = str(err["msg"]).removeprefix("Value error, ")
        if not field:  # a check across settings names them itself
            raise SettingsError(f"invalid settings: {message}") from None
        raise SettingsError(f"invalid setting {ENV_PREFIX}{field.upper()}: {message}") from None
    settings.prepare_dirs()
    return settings
