"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the compose file against the Compose
Specification's JSON schema (vendored: compose-spec.SOURCE), each service's command against the one the end-to-end
tests run, and what the deployment needs (GPU reservation and a CPU profile, health checks, restart policies, the
shared data volume, a non-root image with torch chosen by a build argument)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.e2e.commands import COMPOSE_COMMANDS

REPO = Path(__file__).resolve().parents[2]
SCHEMA = Path(__file__).with_name("compose-spec.json")
INFRA = {"postgres", "redis"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def test_compose_file_follows_the_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    broken = dict(compose, services={"api": {"command": 42, "restart": "sometimes"}})
    assert list(validator.iter_errors(broken))  # the schema does reject what is wrong


def test_each_service_runs_the_command_the_end_to_end_tests_run(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == INFRA | set(COMPOSE_COMMANDS)  # no process the tests do not run
    for name, command in COMPOSE_COMMANDS.items():
        assert services[name]["command"] == command, name


def test_deployment_shape(compose: dict[str, Any]) -> None:
    services = compose["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker-cpu"]["profiles"] == ["cpu"] and "deploy" not in services["worker-cpu"]
    assert services["worker-cpu"]["environment"]["UNSLOTH_DEVICE"] == "cpu"
    for name in ("postgres", "redis", "api", "worker", "worker-cpu", "housekeeping"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name]["restart"] == "unless-stopped", name
    assert services["migrate"]["restart"] == "no"
    for name in ("api", "worker", "worker-cpu", "housekeeping"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}, name
        assert "data:/data" in services[name]["volumes"], name
        env = services[name]["environment"]
        assert env["UNSLOTH_DATA_DIR"] == "/data" and env["UNSLOTH_BROKER_URL"].startswith("redis://"), name
        assert env["UNSLOTH_DATABASE_URL"].startswith("postgresql://"), name
    grace = int(services["worker"]["stop_grace_period"].rstrip("s"))
    from app.core.config import Settings

    assert grace > Settings.model_fields["shutdown_grace_s"].default  # the worker checkpoints before it is killed


def test_dockerfile_is_slim_non_root_with_a_torch_build_argument() -> None:
    text = (REPO / "Dockerfile").read_text()
    # A Python minor on a named Debian release: a rebuild cannot move the image to another OS release.
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim-(bookworm|trixie)(@sha256:[0-9a-f]{64})?$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", text, re.M)
    # Everything the image copies gets past .dockerignore (which excludes all but what is named).
    allowed = {line[1:].removesuffix("/**") for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = {name for line in re.findall(r"^COPY (.+) \S+$", text, re.M) for name in line.split()}
    assert copied <= allowed, copied - allowed
    assert "--require-hashes -r requirements/default-model.txt" in text  # the default model pinned by hash
    assert re.search(r"^ARG TORCH_VARIANT=", text, re.M) and "TORCH_VERSION" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    makefile = (REPO / "Makefile").read_text()
    pinned = re.search(r"^TORCH_VERSION \?= (\S+)", makefile, re.M)
    assert pinned and f"ARG TORCH_VERSION={pinned.group(1)}" in text  # the same torch as `make install`
