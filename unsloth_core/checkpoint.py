"""Hugging Face model directories: safetensors weights (sharded with an index, or one file), config.json,
generation_config.json, and the tokenizer files copied alongside. Never pickle.

Every directory we write is written atomically: into a temporary sibling, fsynced, renamed into place, and then a
`manifest.json` listing every file and its size is written last. A directory without a manifest is torn (the
process died mid-write) and is never loaded as a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from unsloth_core.config import LlamaConfig
from unsloth_core.errors import ModelFormatError
from unsloth_core.model import Llama
from unsloth_core.quant import NF4Tensor, dense, quantize_model, should_quantize

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.")
    name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- atomic directories ----


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, extra: Mapping[str, Any] | None = None) -> None:
    """List every file with its size, written via a temp file + rename so the manifest itself is never torn."""
    files = {
        str(p.relative_to(directory)): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files, **(extra or {})}, indent=2, sort_keys=True))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / MANIFEST)
    fsync_dir(directory)


def is_complete(directory: str | os.PathLike[str]) -> bool:
    """True when the directory has a manifest and every file it lists is present with the recorded size."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((directory / name).is_file() and (directory / name).stat().st_size == size
               for name, size in files.items())


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` and gets its manifest. On an error (a full disk
    included) nothing of the write is left: neither the temporary directory nor, when the error came after the
    rename (the manifest's write), a `final` without its manifest."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the API and worker processes may run as different users
    renamed = False
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            # Move the old copy aside first: a crash between the two renames leaves no torn directory at `final`.
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        renamed = True
        fsync_dir(final.parent)
        write_manifest(final, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if renamed and not is_complete(final):  # torn: a reader would skip it, but it would hold the space
            shutil.rmtree(final, ignore_errors=True)
        raise


# ---- safetensors ----


def save_state_dict(state: Mapping[str, torch.Tensor], directory: Path, max_shard_bytes: int = 2 * 2**30,
                    prefix: str = "model") -> None:
    """One `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` plus the HF index when it is large."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / f"{prefix}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def weight_files(directory: Path) -> list[Path]:
    if (directory / INDEX_FILE).is_file():
        try:
            index = json.loads((directory / INDEX_FILE).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{directory / INDEX_FILE} is not a valid safetensors index: {e}") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise ModelFormatError(f"{directory} is missing weight shards listed in its index: {', '.join(missing)}")
        return [directory / n for n in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt*")):
        raise ModelFormatError(
            f"{directory} holds only pickle weights (*.bin/*.pt); this engine loads safetensors only. "
            f"Convert them with transformers (`save_pretrained(..., safe_serialization=True)`) first."
        )
    raise ModelFormatError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")


def load_state_dict(directory: Path, device: torch.device | str = "cpu",
                    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files, each passed through `transform` as soon as it is read (so a
    cast or a quantization never holds the whole model at its stored size)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    t = f.get_tensor(name)
                    state[name] = transform(name, t) if transform is not None else t
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFormatError(f"cannot read {path}: the file is truncated or not safetensors ({e})") from None
    return state


# ---- models ----


def load_model(directory: str | os.PathLike[str], device: torch.device | str = "cpu",
               dtype: str | torch.dtype | None = None, load_in_4bit: bool = False) -> Llama:
    """Load a Hugging Face Llama directory. `dtype` None keeps the stored dtype. `load_in_4bit` stores the seven
    projections of every block in NF4 (quant.py), each quantized as it is read, and computes in `dtype`."""
    directory = Path(directory)
    if not directory.exists():
        raise ModelFormatError(f"model path {directory} does not exist")
    if not directory.is_dir():
        raise ModelFormatError(f"model path {directory} is not a directory (a .gguf file? import it first)")
    config = LlamaConfig.from_file(directory)
    target = parse_dtype(dtype)

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        t = t.to(target) if target is not None else t
        return NF4Tensor.from_dense(t) if load_in_4bit and should_quantize(name) else t

    state = load_state_dict(directory, device, cast)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some exporters write the tied head anyway
    with torch.device("meta"):
        model = Llama(config)
    if load_in_4bit:
        model.requires_grad_(False)  # a 4-bit weight cannot require grad; LoRA injection picks what trains
    expected = {k for k in model.state_dict() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    unexpected = {k for k in unexpected if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ModelFormatError(
            f"weights in {directory} do not match a Llama with this config.json: "
            f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in state.items():
        if t.shape != model.get_parameter(name).shape:
            raise ModelFormatError(f"{name} has shape {tuple(t.shape)} in {directory}, the config implies "
                                   f"{tuple(model.get_parameter(name).shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if load_in_4bit:
        quantize_model(model)  # the weights are NF4 already: this gives their layers the dequantizing forward
    model.init_buffers(device)
    model.config.torch_dtype = dtype_name(model.dtype)
    return model.eval()


def model_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    """Base-model weights under HF names (tied LM head omitted, as transformers writes it); 4-bit weights
    dequantized, so the directory is a plain 16/32-bit checkpoint any Llama loader reads."""
    state = {k: dense(v) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_model(model: Llama, directory: str | os.PathLike[str], *, tokenizer_dir: str | os.PathLike[str] | None = None,
               dtype: str | torch.dtype | None = None, max_shard_bytes: int = 2 * 2**30,
               generation_config: Mapping[str, Any] | None = None) -> Path:
    """Write `model` as a Hugging Face directory (atomically). Returns the directory."""
    target = parse_dtype(dtype) or model.dtype
    state = {k: v.to(target) for k, v in model_state_dict(model).items()}
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        config = dataclasses.replace(model.config, torch_dtype=dtype_name(target))
        config.save(tmp)
        save_state_dict(state, tmp, max_shard_bytes)
        write_generation_config(config, tmp, generation_config)
        if tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)
    return directory


def write_generation_config(config: LlamaConfig, directory: Path, overrides: Mapping[str, Any] | None = None) -> None:
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, **(overrides or {})}
    if config.pad_token_id is not None:
        gen["pad_token_id"] = config.pad_token_id
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
