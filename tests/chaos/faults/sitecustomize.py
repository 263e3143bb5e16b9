"""Fault injection for the chaos tests, loaded by the worker processes they start (this directory is put on their
PYTHONPATH; Python imports `sitecustomize` at start-up). Nothing in the service knows about it.

A test asks for a fault by writing `<CHAOS_FAULTS_DIR>/next.json` before it creates the job: the first job to reach
one of the hooks below takes it (renames it to `<job id>.json`, which holds for every later attempt of that job).
Without such a file this module changes nothing. The faults:

- `{"tear_checkpoint": N}`: the process dies (os._exit, as an OOM kill would) when the checkpoint of step N has its
  files in place and its manifest is not written yet: a torn checkpoint. Once (a marker file next to the request),
  so the attempt that resumes can write step N again.
- `{"exit_at_step": N}`: the process dies as it logs step N or later, on every attempt.
- `{"step_ms": N}`: each logged step takes at least N ms more, so that a job lasts long enough for a test to act
  while it runs, however fast the machine trains.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

KILLED = 137  # what a shell reports for a SIGKILLed (OOM-killed) process
FAULTS = Path(os.environ.get("CHAOS_FAULTS_DIR", "/nonexistent"))


def fault(job_id: str, name: str) -> int | None:
    path = FAULTS / f"{job_id}.json"
    if not path.exists():
        with contextlib.suppress(OSError):  # another process took it first, or none was asked for
            os.rename(FAULTS / "next.json", path)
    try:
        value = json.loads(path.read_text()).get(name)
    except (OSError, ValueError):
        return None
    return None if value is None else int(value)


def _tear_checkpoint(module: ModuleType) -> None:
    write_manifest = module.write_manifest

    def torn(directory: Path, extra: Any = None) -> None:
        job_id = directory.parents[2].name  # <data>/jobs/<job id>/attempt-<n>/checkpoints/step-<step>
        step = fault(job_id, "tear_checkpoint")
        marker = FAULTS / f"{job_id}.torn"
        if step is not None and directory.name == f"step-{step:06d}" and not marker.exists():
            marker.write_text(str(directory))
            os._exit(KILLED)  # the files are renamed into place; the manifest never comes
        write_manifest(directory, extra)

    module.write_manifest = torn


def _on_log(module: ModuleType) -> None:
    on_log = module.JobCallbacks.on_log

    def faulty(self: Any, metrics: dict[str, Any]) -> None:
        job_id = self.lease.job_id
        step = fault(job_id, "exit_at_step")
        if step is not None and int(metrics["step"]) >= step:
            os._exit(KILLED)
        pause = fault(job_id, "step_ms")
        if pause:
            time.sleep(pause / 1000)
        on_log(self, metrics)

    module.JobCallbacks.on_log = faulty


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the named module is first imported."""

    def __init__(self, patches: dict[str, Callable[[ModuleType], None]]) -> None:
        self.patches = patches

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        patch = self.patches.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if FAULTS.is_dir():
    sys.meta_path.insert(0, _PatchAfterImport({"unsloth_core.checkpoint": _tear_checkpoint,
                                               "worker.training": _on_log}))
