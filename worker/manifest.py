"""A finished job's reproducibility manifest: what re-creates it and what it ran on.

`request` is a create body with every hyperparameter as resolved (no "auto" left), the seed and the same files: on
the CPU, creating a job from it trains the same adapter bit for bit (tests/worker/test_results.py). The rest says
what the bits depended on: the data files' and the base model's SHA-256, the adapter a continued fine-tune started
from, the code and library versions, the device and the kernel settings. Base model files are hashed once per
(path, size, mtime) and the digests cached in the data dir, so an 8B model is not re-read at the end of every job.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from app.db.models import File, Job
from worker.context import WorkerContext

HASH_CACHE = "cache/file_hashes.json"


def build_manifest(ctx: WorkerContext, job: Job, *, base: Path, init_adapter: Path | None, device: str,
                   dtype: str) -> dict[str, Any]:
    with ctx.sessions() as session:
        files = {param: session.get(File, file_id) for param, file_id in
                 (("training_file", job.training_file), ("validation_file", job.validation_file)) if file_id}
    request = {"model": job.model, "training_file": job.training_file, "seed": job.seed, "method": job.method}
    if job.validation_file:
        request["validation_file"] = job.validation_file
    if job.suffix:
        request["suffix"] = job.suffix
    return {
        "object": "fine_tuning.job.manifest",
        "job_id": job.id,
        "request": request,
        "data": {param: {"id": row.id, "sha256": row.sha256, "bytes": row.bytes}
                 for param, row in files.items() if row is not None},
        "base_model": {"path": base.name, "files": hash_dir(ctx, base)},
        "continued_from": ({"model": job.model, "files": hash_dir(ctx, init_adapter)}
                           if init_adapter is not None else None),
        "software": software(),
        "device": {"type": device, "dtype": dtype, **_device_name(device)},
        "settings": {"kernels": os.environ.get("UNSLOTH_KERNELS", "auto"),
                     "fused_lora": os.environ.get("UNSLOTH_FUSED_LORA", "1"),
                     "torch_threads": ctx.settings.torch_threads},
        "attempts": job.attempt + 1,
    }


def software() -> dict[str, Any]:
    import torch

    versions = {"unsloth_service": _version("unsloth-service"), "python": platform.python_version(),
                "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
                "safetensors": _version("safetensors"), "tokenizers": _version("tokenizers")}
    return {**versions, "git_commit": _git_commit()}


def hash_dir(ctx: WorkerContext, directory: Path) -> dict[str, str]:
    """SHA-256 of every file in `directory` (by relative name), from the cache where the file is unchanged."""
    cache_path = ctx.settings.data_dir / HASH_CACHE
    try:
        cache: dict[str, Any] = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    out, changed = {}, False
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in cache:
            cache[key], changed = _sha256(path), True
        out[str(path.relative_to(directory))] = cache[key]
    if changed:
        _save(cache_path, cache)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _save(path: Path, cache: dict[str, Any]) -> None:
    """Best effort (a lost cache costs a re-hash), and whole: written aside, then renamed over."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        pass


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The source tree's commit when it is a git checkout (a wheel or an image has none)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _device_name(device: str) -> dict[str, Any]:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    return {"name": platform.processor() or platform.machine()}
