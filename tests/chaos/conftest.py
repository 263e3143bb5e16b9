"""Chaos tests: compose's real processes (API, housekeeping worker, training workers, as tests/e2e starts them) on a
private PostgreSQL server and a private Redis server of their own, started from the installed binaries on free ports,
so a test can kill, freeze and restart any of them.

- The servers live for the session; each test module gets its own database, an empty Redis, a fresh data dir and its
  own processes (`chaos` fixture, declared per module with the settings the module needs).
- Faults inside a process come from `faults/sitecustomize.py`, on every process's PYTHONPATH: a test asks for one in
  the next job with `Chaos.fault_next_job`.
- After every test, whatever it did, the servers are brought back and the invariants of `invariants.py` are checked
  on the jobs database (a watcher also samples it while the test runs).

Settings are short, as in tests/e2e: 3 s leases, 0.5 s heartbeats, a reaper every second, one torch thread.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.chaos.invariants import Watcher, violations
from tests.chaos.servers import PostgresServer, RedisServer
from tests.e2e.conftest import Proc, Stack, compose_stack, tiny_base, worker_command

__all__ = ["tiny_base"]  # the e2e tiny model fixture, shared

FAULTS = Path(__file__).with_name("faults")


@dataclass
class Servers:
    pg: PostgresServer
    redis: RedisServer


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pg = redis = None
    try:
        pg = PostgresServer()
        pg.start()
        redis = RedisServer(tmp_path_factory.mktemp("chaos-redis"))
        redis.start()
        yield Servers(pg, redis)
    finally:
        for server in (redis, pg):
            if server is not None:
                server.close()


@dataclass
class Chaos:
    """One module's service: its processes (`stack`), the servers under it and its database."""

    stack: Stack
    servers: Servers
    db_url: str  # for psycopg
    faults: Path  # CHAOS_FAULTS_DIR: faults asked for, per job, and the markers of those that fired

    @property
    def pg(self) -> PostgresServer:
        return self.servers.pg

    @property
    def redis(self) -> RedisServer:
        return self.servers.redis

    def start_worker(self, name: str, **env: str) -> Proc:
        """A training worker (compose's command, its own node name unless `worker`); `env` adds settings."""
        full = {**self.stack.env, **env}
        old = self.stack.procs.get(name)
        if old is not None and old.alive():
            old.stop()
        return self.stack.start(name, worker_command(name), full)

    def fault_next_job(self, **spec: int) -> None:
        """Ask for a fault in the next job to run (see faults/sitecustomize.py), e.g. `tear_checkpoint=20`."""
        tmp = self.faults / "next.json.tmp"
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, self.faults / "next.json")

    def faulty(self, job_id: str) -> dict[str, int]:
        """The fault this job took (an error if it took none)."""
        return dict(json.loads((self.faults / f"{job_id}.json").read_text()))

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's row, read from the database directly (the API may be what is under test)."""
        with psycopg.connect(self.db_url, connect_timeout=5) as conn:
            cur = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,))
            names = [d.name for d in cur.description or ()]
            row = cur.fetchone()
        assert row is not None, job_id
        return dict(zip(names, row))

    def holder(self, job_id: str) -> tuple[int, int]:
        """(worker main pid, pool process pid) of the lease on a running job: `<node>/<main pid>/<pid>/<random>`."""
        owner = self.stack.wait(lambda: self.job(job_id)["lease_owner"], 30, f"job {job_id} to be leased")
        main, child = str(owner).split("/")[1:3]
        return int(main), int(child)

    def worker_holding(self, job_id: str) -> Proc:
        main, _ = self.holder(job_id)
        return next(p for p in self.stack.procs.values() if p.pid == main)

    def wait_attempt(self, job_id: str, attempt: int, status: str = "running", timeout: float = 60) -> None:
        def reached() -> bool:
            row = self.job(job_id)
            return bool(row["attempt"] >= attempt and row["status"] == status)

        self.stack.wait(reached, timeout, f"job {job_id} to be {status} as attempt {attempt}", interval=0.1)

    def wait_warm(self, name: str) -> None:
        """Until the training worker's pool process has loaded the engine (it claims a job at once from then on)."""
        self.stack.wait(lambda: "ready in" in self.log_of(name), 90, f"the pool process of {name}")

    def log_of(self, name: str) -> str:
        return self.stack.procs[name].log.read_text(errors="replace")


@pytest.fixture(scope="session")
def chaos_factory(servers: Servers, tiny_base: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Callable[..., contextlib.AbstractContextManager[Chaos]]:
    """`with chaos_factory(name, workers=(...), UNSLOTH_X="..."):` a module's service on a database of its own."""

    @contextlib.contextmanager
    def make(name: str, *, workers: tuple[str, ...] = ("worker",), broker_options: dict[str, Any] | None = None,
             **env: str) -> Iterator[Chaos]:
        servers.pg.start()
        servers.redis.start()
        db = f"chaos_{name}_{secrets.token_hex(3)}"
        servers.pg.create_database(db)
        import redis

        redis.Redis.from_url(servers.redis.url).flushall()
        root = tmp_path_factory.mktemp(f"chaos-{name}")
        (root / "data").mkdir()
        (root / "logs").mkdir()
        (root / "faults").mkdir()
        url = servers.pg.url(db)
        settings = {"UNSLOTH_RESEND_AFTER_S": "6", "UNSLOTH_RESEND_MAX_INTERVAL_S": "12",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])),
                    "CHAOS_FAULTS_DIR": str(root / "faults"), **env}
        with compose_stack(name, root / "data", root / "logs", tiny_base, database_url=url,
                           broker_url=servers.redis.url, broker_options=broker_options, workers=workers,
                           **settings) as stack:
            chaos = Chaos(stack, servers, url, root / "faults")
            for worker in workers:
                chaos.wait_warm(worker)
            yield chaos

    return make


SERVER_ERROR = re.compile(r'"[A-Z]+ (\S+) HTTP/[\d.]+" (5(?!03)\d\d)')  # an access log line of a 5xx but 503


@pytest.fixture(autouse=True)
def _invariants(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test, with its servers up again: the invariants hold on every job of the module's database, and
    the API answered nothing with a server error other than 503 (unavailable, with the error envelope)."""
    chaos: Chaos = request.getfixturevalue("chaos")
    api_log_start = len(chaos.log_of("api"))
    watcher = Watcher(chaos.db_url).start()
    try:
        yield
    finally:
        chaos.pg.start()  # a test that failed half-way may have left one down
        chaos.redis.start()
        problems = watcher.stop() + violations(chaos.db_url, chaos.stack.data_dir)
    problems += [f"the API answered {status} to {path}" for path, status in
                 SERVER_ERROR.findall(chaos.log_of("api")[api_log_start:])]
    assert not problems, "invariants broken:\n" + "\n".join(problems)


def freeze(pid: int) -> None:
    """SIGSTOP a worker's whole process group (main process and pool processes)."""
    os.killpg(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    os.killpg(pid, signal.SIGCONT)
