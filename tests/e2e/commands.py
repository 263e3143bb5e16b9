"""The service's processes, as docker-compose.yml runs them. The end-to-end tests run exactly these commands (the
compose test checks the file against this table), with `python` and the console scripts taken from this
interpreter's environment."""

from __future__ import annotations

import sys
from pathlib import Path

MIGRATE = ["alembic", "upgrade", "head"]
API = ["python", "-m", "app"]
WORKER = ["unsloth", "worker"]
HOUSEKEEPING = ["unsloth", "worker", "--role", "housekeeping"]
SERVE = ["unsloth", "serve"]  # the embedded mode: what `make serve` runs

COMPOSE_COMMANDS = {"migrate": MIGRATE, "api": API, "worker": WORKER, "worker-cpu": WORKER,
                    "housekeeping": HOUSEKEEPING}


def resolve(command: list[str]) -> list[str]:
    """`python` is this interpreter; other programs are the scripts installed beside it."""
    program = sys.executable if command[0] == "python" else str(Path(sys.executable).parent / command[0])
    return [program, *command[1:]]
