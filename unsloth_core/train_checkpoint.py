"""Training checkpoints that resume to the same bits, written without pickle.

A checkpoint directory is a servable artifact first (a PEFT adapter, or a full HF model directory) plus the state
to continue training: `optimizer.safetensors` (AdamW moments, flattened by parameter name), `rng.safetensors`
(torch CPU/CUDA generator states), `trainer_state.json` (step, data position, Python RNG, metric history), and
`method_state.safetensors` where the training method keeps state of its own (GRPO's rollout between iterations).
It is written atomically with a manifest last (see checkpoint.atomic_directory); a directory without a complete
manifest is torn and never resumed from.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unsloth_core.checkpoint import atomic_directory, is_complete, save_state_dict
from unsloth_core.errors import ModelFormatError
from unsloth_core.lora import ADAPTER_CONFIG, load_adapter_weights, write_adapter_files
from unsloth_core.method import MethodState
from unsloth_core.model import Llama

OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
METHOD_STATE_FILE = "method_state.safetensors"  # tensors, and JSON data in the file's metadata under "state"
CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where training is: what a resumed run needs to continue exactly, and what was measured so far."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    tokens_seen: int = 0  # real (non-pad) input tokens processed
    trained_tokens: int = 0  # target tokens the loss was computed on
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `directory`, oldest first. Torn ones (no complete manifest) are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = CHECKPOINT_DIR.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_torn(directory: str | Path) -> list[Path]:
    """Delete checkpoint directories a crash left half-written (and stray temporaries); return what went."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.iterdir():
        torn = CHECKPOINT_DIR.match(p.name) and not is_complete(p)
        temp = p.name.startswith(".step-") and (p.name.endswith(".tmp") or p.name.endswith(".old"))
        if p.is_dir() and (torn or temp):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def save_checkpoint(directory: Path, model: Llama, optimizer: torch.optim.Optimizer, state: TrainerState,
                    extra_files: Mapping[str, Path] | None = None, base_model: str | None = None,
                    method_state: MethodState | None = None) -> Path:
    """Write the checkpoint for `state.step` under `directory` atomically and return its path."""
    final = directory / checkpoint_name(state.step)
    with atomic_directory(final, manifest={"step": state.step}) as tmp:
        if model.lora_config is not None:
            write_adapter_files(model, tmp, base_model)
        else:
            model.config.save(tmp)
            save_state_dict({k: v for k, v in model.state_dict().items()
                             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}, tmp)
        save_file(optimizer_tensors(model, optimizer), str(tmp / OPTIMIZER_FILE))
        save_file(rng_tensors(), str(tmp / RNG_FILE))
        if method_state is not None:
            tensors, data = method_state
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / METHOD_STATE_FILE),
                      metadata={"state": json.dumps(data)})
        trainer_state = {**asdict(state), "python_rng": _python_rng_state(),
                         "optimizer_groups": [{k: v for k, v in g.items() if k != "params"}
                                              for g in optimizer.param_groups]}
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        for name, src in (extra_files or {}).items():
            if src.is_file():
                shutil.copy2(src, tmp / name)
    return final


def load_checkpoint(path: Path, model: Llama, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore weights, optimizer moments and RNG states from a checkpoint; return the trainer state."""
    if not is_complete(path):
        raise ModelFormatError(f"checkpoint {path} is incomplete (no valid manifest): it was torn by a crash")
    if (path / ADAPTER_CONFIG).is_file():
        load_adapter_weights(model, path)
    else:
        from unsloth_core.checkpoint import load_state_dict

        with torch.no_grad():
            for name, value in load_state_dict(path).items():
                model.get_parameter(name).copy_(value)
    restore_optimizer(model, optimizer, load_file(str(path / OPTIMIZER_FILE)))
    data = json.loads((path / STATE_FILE).read_text())
    for group, saved in zip(optimizer.param_groups, data.pop("optimizer_groups")):
        group.update(saved)
    restore_rng(load_file(str(path / RNG_FILE)), data.pop("python_rng"))
    return TrainerState(**data)


def load_method_state(path: Path) -> MethodState | None:
    """The training method's own state in a checkpoint (tensors on the CPU), None when it kept none."""
    file = path / METHOD_STATE_FILE
    if not file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        data = json.loads((f.metadata() or {}).get("state", "{}"))
    return load_file(str(file)), data


# ---- optimizer state as named tensors ----


def optimizer_tensors(model: Llama, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"{names[id(p)]}::{key}"] = value.detach().cpu().contiguous()
    return out


def restore_optimizer(model: Llama, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, slot = key.split("::")
        p = params[name]
        optimizer.state[p][slot] = value.to(p.device) if slot != "step" else value


# ---- random number generators ----


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out[f"torch_cuda_{i}"] = torch.cuda.get_rng_state(i)
    return out


def _python_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list[Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    for key, value in tensors.items():
        if key.startswith("torch_cuda_") and torch.cuda.is_available():
            idx = int(key.rsplit("_", 1)[1])
            if idx < torch.cuda.device_count():
                torch.cuda.set_rng_state(value, idx)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def prune_checkpoints(directory: Path, keep: int | None, protect: Path | None = None) -> None:
    """Keep the newest `keep` complete checkpoints (and never the one `protect` names)."""
    if keep is None or keep < 1:
        return
    checkpoints = list_checkpoints(directory)
    for _, path in checkpoints[:-keep]:
        if protect is None or path.resolve() != protect.resolve():
            shutil.rmtree(path, ignore_errors=True)
