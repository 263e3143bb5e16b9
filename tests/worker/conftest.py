"""Worker tests: the training task's body (`worker.training.run_job`) and the lifecycle's fenced writes, run in this
process against real databases (SQLite as the embedded mode uses it; a private PostgreSQL database), with the real
engine training a tiny model. The broker is a recorder here; real brokers and processes are tests/e2e's.

Settings are short: 3 s leases renewed every 0.3 s, a metrics event every step.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import select

from app.core.config import Settings, load_settings
from app.db import migrate
from app.db.models import ApiKey, Checkpoint, File, Job, JobEvent
from app.schemas.jobs import JobCreate
from app.services import files, jobs, keys
from tests.helpers import tiny_model_dir
from worker.context import WorkerContext

PG_ADMIN_URL = os.environ.get("UNSLOTH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
TINY = "tiny-chat"


@dataclass
class RecordingBroker:
    """Stands in for `app.core.broker.Broker`: keeps the train (and export, and eval run) messages sent."""

    settings: Settings
    sent: list[tuple[str, int]] = field(default_factory=list)
    exports_sent: list[tuple[str, int]] = field(default_factory=list)
    evals_sent: list[tuple[str, int]] = field(default_factory=list)

    def send_train(self, job_id: str, attempt: int) -> None:
        self.sent.append((job_id, attempt))

    def send_export(self, export_id: str, attempt: int) -> None:
        self.exports_sent.append((export_id, attempt))

    def send_eval(self, run_id: str, attempt: int) -> None:
        self.evals_sent.append((run_id, attempt))

    def close(self) -> None:
        pass


@dataclass
class WorkerEnv:
    name: str
    settings: Settings
    ctx: WorkerContext
    broker: RecordingBroker
    key: ApiKey

    def upload(self, rows: list[dict[str, Any]] | bytes) -> str:
        content = rows if isinstance(rows, bytes) else "".join(json.dumps(r) + "\n" for r in rows).encode()
        from app.core import ids

        file_id = ids.new_id(ids.FILE)
        relative = Path("files") / f"{file_id}.jsonl"
        (self.settings.data_dir / relative).write_bytes(content)
        report = files.validate_training_file(self.settings.data_dir / relative)
        with self.ctx.sessions() as session:
            session.add(File(id=file_id, owner_id=self.key.id, filename="train.jsonl", purpose="fine-tune",
                             bytes=len(content), status="processed" if report["ok"] else "error",
                             validation=report, path=str(relative), sha256=hashlib.sha256(content).hexdigest()))
            session.commit()
        return file_id

    def create_job(self, training_file: str, *, model: str = TINY, seed: int = 7, **hp: Any) -> str:
        defaults = {"n_epochs": 1, "batch_size": 2, "learning_rate": 5e-3, "lora_r": 4, "n_checkpoints": 2,
                    "max_seq_length": 128}
        payload = JobCreate.model_validate({
            "model": model, "training_file": training_file, "seed": seed,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {**defaults, **hp}}}})
        with self.ctx.sessions() as session:
            job = jobs.create_job(session=session, settings=self.settings, broker=self.broker,  # type: ignore[arg-type]
                                  key=self.key, payload=payload, idempotency_key=secrets.token_hex(8),
                                  retry_count=0)
            return job.id

    def job(self, job_id: str) -> Job:
        with self.ctx.sessions() as session:
            row = session.get(Job, job_id)
            assert row is not None
            return row

    def events(self, job_id: str) -> list[JobEvent]:
        with self.ctx.sessions() as session:
            return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        with self.ctx.sessions() as session:
            return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                        .order_by(Checkpoint.step_number)))

    def update_job(self, job_id: str, **values: Any) -> None:
        with self.ctx.sessions() as session:
            row = session.get(Job, job_id)
            assert row is not None
            for k, v in values.items():
                setattr(row, k, v)
            session.commit()


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-base"), std=0.05)


def worker_settings(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    return {"data_dir": data_dir, "lease_s": 3.0, "heartbeat_s": 0.3, "metrics_every_steps": 1,
            "reaper_interval_s": 1.0, "max_job_restarts": 2, "device": "cpu", "broker_url": "memory://", **overrides}


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        tiny_base: Path) -> Iterator[WorkerEnv]:
    name = request.param
    data_dir = tmp_path_factory.mktemp(f"worker-{name}")
    (data_dir / "models").mkdir()
    (data_dir / "models" / TINY).symlink_to(tiny_base, target_is_directory=True)
    overrides = worker_settings(data_dir)
    db_name = f"unsloth_worker_{secrets.token_hex(4)}"
    if name == "postgresql":
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db_name}"')
        overrides["database_url"] = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + db_name
    settings = load_settings(**overrides)
    migrate.upgrade(settings.database_url)
    ctx = WorkerContext.build(settings)
    ctx.broker.close()
    broker = RecordingBroker(settings)
    ctx.broker = broker  # type: ignore[assignment]
    try:
        with ctx.sessions() as session:
            key, _ = keys.create_key(session=session, name="worker-tests")
        yield WorkerEnv(name, settings, ctx, broker, key)
    finally:
        ctx.engine.dispose()
        if name == "postgresql":
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def fact_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    from unsloth_core.data.synthetic import fact_rows as rows

    return rows(n, seed=seed)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Train on one thread, as a worker sharing the machine would (UNSLOTH_TORCH_THREADS): tiny ops on a pool of
    threads contending with other processes are many times slower. Restored afterwards for other tiers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
