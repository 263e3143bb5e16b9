"""Private PostgreSQL and Redis servers for the chaos tests, started from the installed binaries on free loopback
ports so that a test can stop, kill and restart them without touching the machine's shared servers.

PostgreSQL refuses to run as root: when the tests run as root, the cluster belongs to the `postgres` user and its
commands run as that user. Every server runs in its own process group, and `close()` kills it whatever happened.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis

from tests.e2e.conftest import free_port

PR_SET_PDEATHSIG = 1
try:
    _prctl: Callable[..., int] | None = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_us() -> None:
    """In the child, before exec: SIGKILL when the process that started it dies, even by SIGKILL (Linux), so a
    killed test run leaves no server behind. (Set after any change of user: that clears it.) Only a system call
    here: the child of a process with threads must not take locks before exec."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is None:
        raise RuntimeError("PostgreSQL's server binaries (pg_ctl, initdb) are not installed")
    return Path(pg_ctl).resolve().parent


class _Server:
    """A server process of ours, in a process group of its own."""

    proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class PostgresServer(_Server):
    """A fresh cluster in a temporary directory of its own (pytest's are private to root, which the `postgres` user
    could not enter), listening on 127.0.0.1:`port` only (no Unix socket in a shared directory)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="unsloth-chaos-pg-"))
        self.port, self.bin = free_port(), _pg_bin()
        self.data, self.log = self.root / "data", self.root / "postgres.log"
        self.user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.proc: subprocess.Popen[bytes] | None = None
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                   "--no-sync", "--no-instructions"])
        # No fsync: a killed server still loses no committed transaction (its writes are in the kernel); only a crash
        # of the machine would. Commits stay synchronous, so a restart never rolls back what the service saw commit.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                       "fsync = off\nfull_page_writes = off\nmax_connections = 200\n"
                       "shared_buffers = 32MB\n")

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _demote(self) -> None:
        os.setsid()
        if self.user is not None:
            os.setgid(self.user.pw_gid)
            os.setuid(self.user.pw_uid)
        _die_with_us()

    def _run(self, command: list[str]) -> None:
        with open(self.log, "ab") as out:
            subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           preexec_fn=self._demote, cwd=self.root, timeout=120)
        if self.user is not None and self.log.exists():
            os.chown(self.log, self.user.pw_uid, self.user.pw_gid)

    def accepts(self) -> bool:
        try:
            with psycopg.connect(self.admin_url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def start(self) -> None:
        """The postmaster as our child (its own process group); returns once it accepts connections."""
        if self.alive():
            return
        out = open(self.log, "ab")  # noqa: SIM115 (held by the child)
        try:
            self.proc = subprocess.Popen([str(self.bin / "postgres"), "-D", str(self.data)], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=self._demote,
                                         cwd=self.root)
        finally:
            out.close()
        _wait(lambda: self.accepts() or not self.alive(), 60, f"PostgreSQL on port {self.port}")
        if not self.alive():
            raise RuntimeError(f"PostgreSQL did not start; see {self.log}")

    def stop(self, mode: str = "immediate") -> None:
        """`fast` (SIGINT: disconnect clients, clean shutdown) or `immediate` (SIGQUIT: like a crash)."""
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, down_s: float = 0.0, mode: str = "immediate") -> None:
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer(_Server):
    """redis-server on 127.0.0.1:`port` with no persistence: a restart loses every message, like a crash of a Redis
    without an append-only file."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.log = root, free_port(), root / "redis.log"
        root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def accepts(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        if self.alive():
            return
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        out = open(self.log, "ab")  # noqa: SIM115 (held by the child)
        try:
            self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", str(self.root), "--protected-mode", "no"],
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_us, cwd=self.root)
        finally:
            out.close()
        _wait(lambda: self.accepts() or not self.alive(), 30, f"Redis on port {self.port}")
        if not self.alive():
            raise RuntimeError(f"Redis did not start; see {self.log}")

    def stop(self) -> None:
        """SIGKILL: every connection drops at once and every message is gone."""
        self.kill()

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
