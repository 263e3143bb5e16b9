"""`unsloth worker`: a Celery worker in one of three roles.

- `training` (the default; compose's `worker`): the `gpu` queue, one job at a time, a fresh process per job (its GPU
  memory is freed when it exits; the next one loads the engine while the worker is idle).
- `housekeeping` (compose's `housekeeping`): the `default` queue and beat, which schedules the reaper and the
  re-sender. Exactly one should run; it needs no GPU.
- `all` (what `unsloth serve` starts): both queues and beat in one worker; housekeeping runs between jobs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from app.core.broker import DEFAULT_QUEUE, GPU_QUEUE
from app.core.config import SettingsError, load_settings
from app.core.threads import apply_torch_threads
from app.db import migrate
from app.db.session import make_engine
from app.services.storage import beat_schedule


@dataclass(frozen=True)
class Role:
    queues: tuple[str, ...]
    beat: bool
    pool: str
    max_tasks_per_child: int  # 0: reuse the process
    warm: bool  # load torch and the engine in each new pool process


ROLES = {
    "training": Role((GPU_QUEUE,), beat=False, pool="prefork", max_tasks_per_child=1, warm=True),
    "housekeeping": Role((DEFAULT_QUEUE,), beat=True, pool="solo", max_tasks_per_child=0, warm=False),
    "all": Role((GPU_QUEUE, DEFAULT_QUEUE), beat=True, pool="prefork", max_tasks_per_child=0, warm=True),
}


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Run a Celery worker of the service (settings from "
                                                            "UNSLOTH_* variables).")
    parser.add_argument("--role", choices=sorted(ROLES), default="training",
                        help="training: the gpu queue (default); housekeeping: reaper + beat; all: both (embedded)")
    parser.add_argument("--hostname", help="the Celery node name (default: <role>@<host name>)")
    parser.add_argument("--max-tasks-per-child", type=int, default=None,
                        help="jobs per pool process before it is replaced (0: never; default by role)")
    return parser


def celery_argv(role_name: str, hostname: str | None, loglevel: str, schedule: str,
                max_tasks_per_child: int | None = None) -> list[str]:
    role = ROLES[role_name]
    argv = ["worker", f"--queues={','.join(role.queues)}", "--concurrency=1", "--prefetch-multiplier=1",
            "-O", "fair", f"--pool={role.pool}", f"--hostname={hostname or role_name + '@%h'}",
            f"--loglevel={loglevel.upper()}", "--without-gossip", "--without-mingle"]
    limit = role.max_tasks_per_child if max_tasks_per_child is None else max_tasks_per_child
    if role.pool == "prefork" and limit > 0:
        argv.append(f"--max-tasks-per-child={limit}")
    if role.beat:
        argv += ["--beat", f"--schedule={schedule}"]
    return argv


def worker_main(argv: Sequence[str] | None = None, prog: str = "unsloth worker") -> int:
    args = _parser(prog).parse_args(argv)
    try:
        settings = load_settings()
        engine = make_engine(settings.database_url)
        try:
            migrate.ensure_schema(settings, engine)
        finally:
            engine.dispose()
    except SettingsError as e:
        print(f"unsloth: {e}", file=sys.stderr)
        return 2
    apply_torch_threads(settings.torch_threads)  # before any pool process loads torch
    from worker.celery_app import make_app

    app = make_app(settings, warm=ROLES[args.role].warm)
    schedule = str(beat_schedule(settings))
    return int(app.start(celery_argv(args.role, args.hostname, settings.log_level, schedule,
                                     args.max_tasks_per_child)) or 0)


if __name__ == "__main__":
    raise SystemExit(worker_main())
