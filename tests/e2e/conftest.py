"""Real processes, driven over HTTP by the `openai` package.

- `pg_stack` (once per session): compose's processes on a private PostgreSQL database and the local Redis (private
  key prefix): `alembic upgrade head`, then the API, a training worker and the housekeeping worker, each started
  with the command in `commands.py` (`compose_stack`, which tests/chaos also uses, on servers of its own).
- The embedded mode (`unsloth serve`) is started by tests/e2e/test_embedded.py itself.

Every process runs in its own process group and is stopped (SIGTERM, then SIGKILL to the group) by the fixture that
started it. Settings are short: 3 s leases, 0.5 s heartbeats, a reaper every second, a metrics event every step,
one torch thread per process (two cores, several processes).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai
import psycopg
import pytest

from tests.e2e.commands import API, HOUSEKEEPING, MIGRATE, WORKER, resolve
from tests.helpers import tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = os.environ.get("UNSLOTH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("UNSLOTH_TEST_REDIS", "redis://127.0.0.1:6379/0")
TINY = "tiny-chat"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(resolve(command), env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole group (the main process, its pool processes, beat)."""
        with contextlib.suppress(OSError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to the main process, then SIGKILL to the group. Returns the exit status if it exited in time."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        return code

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"---- {self.name} ({self.log}) ----\n" + "\n".join(text.splitlines()[-lines:])


@dataclass
class Stack:
    name: str
    env: dict[str, str]
    data_dir: Path
    base_url: str
    key: str
    log_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    counter: int = 0

    def start(self, role: str, command: list[str], env: dict[str, str] | None = None) -> Proc:
        self.counter += 1
        proc = Proc(role, command, env or self.env, self.log_dir / f"{self.counter:02d}-{role}.log")
        self.procs[role] = proc
        return proc

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=self.key, **kwargs)

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.procs.values())

    def wait(self, predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1) -> T:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(interval)

    def wait_status(self, job_id: str, statuses: tuple[str, ...], timeout: float = 120) -> Any:
        client = self.client()

        def done() -> Any:
            job = client.fine_tuning.jobs.retrieve(job_id)
            return job if job.status in statuses else None

        return self.wait(done, timeout, f"job {job_id} to be {' or '.join(statuses)}", interval=0.2)

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            try:
                with urllib.request.urlopen(self.base_url + "/ready", timeout=3) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        self.wait(ready, timeout, f"{self.name} API to be ready", interval=0.25)

    def close(self) -> None:
        procs = list(self.procs.values())
        for proc in procs:  # all at once: each stops gracefully in parallel
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop(timeout=30)


def service_env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH_")}
    env.update({
        "UNSLOTH_DATA_DIR": str(data_dir), "UNSLOTH_HOST": "127.0.0.1", "UNSLOTH_PORT": str(port),
        "UNSLOTH_LEASE_S": "3", "UNSLOTH_HEARTBEAT_S": "0.5", "UNSLOTH_REAPER_INTERVAL_S": "1",
        "UNSLOTH_METRICS_EVERY_STEPS": "1", "UNSLOTH_TORCH_THREADS": "1", "UNSLOTH_RESEND_AFTER_S": "60",
        "UNSLOTH_SHUTDOWN_GRACE_S": "20", "UNSLOTH_DEVICE": "cpu", "UNSLOTH_EVENT_POLL_INTERVAL_S": "0.1",
        "UNSLOTH_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("e2e-tiny"), std=0.05)


def link_tiny(data_dir: Path, tiny: Path) -> None:
    (data_dir / "models").mkdir(parents=True, exist_ok=True)
    (data_dir / "models" / TINY).symlink_to(tiny, target_is_directory=True)


@contextlib.contextmanager
def compose_stack(name: str, data_dir: Path, log_dir: Path, tiny: Path, *, database_url: str, broker_url: str,
                  broker_options: dict[str, Any] | None = None, workers: tuple[str, ...] = ("worker",),
                  **extra_env: str) -> Iterator[Stack]:
    """Compose's processes on the given database and broker: `alembic upgrade head`, then the API, the housekeeping
    worker and one training worker per name in `workers` (each with its own Celery node name). Everything is stopped
    on the way out, whatever happened."""
    import json

    link_tiny(data_dir, tiny)
    key = "sk-e2e-" + secrets.token_hex(12)
    port = free_port()
    env = service_env(data_dir, port, UNSLOTH_DATABASE_URL=database_url, UNSLOTH_BROKER_URL=broker_url,
                      UNSLOTH_BROKER_TRANSPORT_OPTIONS=json.dumps(broker_options or {}), UNSLOTH_API_KEY=key,
                      **extra_env)
    stack = Stack(name, env, data_dir, f"http://127.0.0.1:{port}", key, log_dir)
    try:
        migrate = stack.start("migrate", MIGRATE)
        assert migrate.popen.wait(timeout=120) == 0, stack.logs()  # compose's `migrate`, once
        stack.start("api", API)
        stack.start("housekeeping", HOUSEKEEPING)
        for worker in workers:
            stack.start(worker, worker_command(worker))
        stack.wait_ready()
        yield stack
    finally:
        stack.close()


def worker_command(name: str) -> list[str]:
    """compose's `worker` command; a second training worker on this host gets a node name of its own."""
    return WORKER if name == "worker" else [*WORKER, "--hostname", f"{name}@%h"]


@pytest.fixture(scope="session")
def pg_stack(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Iterator[Stack]:
    """The shared PostgreSQL server (a private database) and the shared Redis (a private key prefix)."""
    db_name = f"unsloth_e2e_{secrets.token_hex(4)}"
    prefix = f"unsloth-e2e-{secrets.token_hex(4)}:"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    try:
        with compose_stack("postgresql", tmp_path_factory.mktemp("e2e-pg-data"),
                           tmp_path_factory.mktemp("e2e-pg-logs"), tiny_base,
                           database_url=PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + db_name, broker_url=REDIS_URL,
                           broker_options={"global_keyprefix": prefix}) as stack:
            yield stack
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        for k in r.scan_iter(match=f"{prefix}*"):
            r.delete(k)


# ---- what the tests send ----


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    import json

    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def upload_facts(client: openai.OpenAI, n: int, seed: int = 0) -> str:
    from unsloth_core.data.synthetic import fact_rows

    return str(client.files.create(file=("facts.jsonl", jsonl(fact_rows(n, seed=seed))), purpose="fine-tune").id)


def create_job(client: openai.OpenAI, training_file: str, *, model: str = TINY, seed: int = 7,
               validation_file: str | None = None, **hp: Any) -> str:
    defaults = {"n_epochs": 1, "batch_size": 2, "learning_rate": 5e-3, "lora_r": 4, "n_checkpoints": 2,
                "max_seq_length": 128}
    method: Any = {"type": "supervised", "supervised": {"hyperparameters": {**defaults, **hp}}}
    extra: Any = {"validation_file": validation_file} if validation_file else {}
    return str(client.fine_tuning.jobs.create(model=model, training_file=training_file, seed=seed,
                                              method=method, **extra).id)


def progress(client: openai.OpenAI, job_id: str) -> dict[str, Any]:
    """The job's `progress` extension (step, total_steps, ...): the worker updates it every N steps."""
    return dict(getattr(client.fine_tuning.jobs.retrieve(job_id), "progress", None) or {})


def trained_steps(stack: Stack, job_id: str, at_least: int) -> None:
    client = stack.client()
    stack.wait(lambda: progress(client, job_id).get("step", 0) >= at_least, 60,
               f"job {job_id} to train {at_least} steps")


def all_events(client: openai.OpenAI, job_id: str) -> list[Any]:
    """Every event of a job, oldest first."""
    return list(reversed(list(client.fine_tuning.jobs.list_events(job_id, limit=100))))


def metric_steps(events: list[Any]) -> list[int]:
    return [e.data["step"] for e in events
            if e.type == "metrics" and e.data and "train_loss" in e.data and "checkpoint" not in e.data]


def status_events(events: list[Any]) -> list[str]:
    return [e.data["status"] for e in events if e.data and "status" in e.data]
