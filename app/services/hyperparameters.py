"""Resolving `"auto"` hyperparameters from the dataset and the model, so a job stores and echoes concrete values.

The epoch rule is OpenAI's (cookbook `Chat_finetuning_data_prep`): 3 epochs, more for small datasets (aiming at 100
examples seen), fewer for large ones (at most 25,000). The LoRA defaults are Unsloth's (r = alpha = 16, no dropout,
every linear layer).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.schemas.jobs import ALL_LINEAR_MODULES, DPOHyperparameters, SupervisedHyperparameters

if TYPE_CHECKING:
    from unsloth_core.lora import LoRAConfig
    from unsloth_core.trainer import TrainArgs

BASE_LEARNING_RATE = {"supervised": 2e-4, "dpo": 5e-6}
DEFAULT_MAX_SEQ_LENGTH = 2048


def auto_epochs(n_examples: int) -> int:
    n = max(n_examples, 1)
    if n * 3 < 100:
        return min(25, math.ceil(100 / n))
    if n * 3 > 25_000:
        return max(1, 25_000 // n)
    return 3


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(16, 2 ** math.floor(math.log2(max(n_examples, 1) / 100)) if n_examples >= 100 else 1))


def resolve(hp: SupervisedHyperparameters, *, method_type: str, n_examples: int,
            context_length: int | None) -> dict[str, Any]:
    """Every field concrete. Where an absolute `learning_rate` is given, the multiplier echoed is lr / base lr."""
    def pick(value: Any, default: Any) -> Any:
        return default if value == "auto" else value

    base_lr = BASE_LEARNING_RATE.get(method_type, BASE_LEARNING_RATE["supervised"])
    n_epochs = pick(hp.n_epochs, auto_epochs(n_examples))
    if hp.learning_rate != "auto":
        learning_rate = float(hp.learning_rate)
        multiplier = learning_rate / base_lr
    else:
        multiplier = float(pick(hp.learning_rate_multiplier, 1.0))
        learning_rate = base_lr * multiplier
    lora_r = pick(hp.lora_r, 16)
    targets = hp.lora_target_modules
    max_len = context_length or DEFAULT_MAX_SEQ_LENGTH
    resolved: dict[str, Any] = {
        "n_epochs": n_epochs,
        "batch_size": pick(hp.batch_size, auto_batch_size(n_examples)),
        "learning_rate_multiplier": multiplier,
        "learning_rate": learning_rate,
        "lora_r": lora_r,
        "lora_alpha": pick(hp.lora_alpha, lora_r),
        "lora_dropout": pick(hp.lora_dropout, 0.0),
        "lora_target_modules": list(ALL_LINEAR_MODULES) if targets in ("auto", "all-linear") else list(targets),
        "lr_scheduler": pick(hp.lr_scheduler, "linear"),
        "warmup_ratio": pick(hp.warmup_ratio, 0.03),
        "max_seq_length": pick(hp.max_seq_length, min(DEFAULT_MAX_SEQ_LENGTH, max_len)),
        "packing": pick(hp.packing, False),
        "n_checkpoints": pick(hp.n_checkpoints, min(3, n_epochs)),
        "load_in_4bit": pick(hp.load_in_4bit, False),
    }
    if isinstance(hp, DPOHyperparameters):
        resolved["beta"] = pick(hp.beta, 0.1)
    return resolved


def estimate_steps(resolved: dict[str, Any], *, n_examples: int, n_tokens: int | None) -> int:
    """Optimizer steps the trainer will take: batches per epoch times epochs (packed rows when packing)."""
    rows = n_examples
    if resolved.get("packing") and n_tokens:
        rows = math.ceil(n_tokens / resolved["max_seq_length"])
    return math.ceil(max(rows, 1) / resolved["batch_size"]) * resolved["n_epochs"]


def stored_hyperparameters(method: dict[str, Any]) -> dict[str, Any]:
    """The resolved hyperparameters a job row keeps under `method.<type>.hyperparameters`."""
    return dict((method.get(method["type"]) or {}).get("hyperparameters") or {})


def train_config(method: dict[str, Any], *, seed: int, output_dir: Path, total_steps: int,
                 metrics_every: int) -> tuple[TrainArgs, LoRAConfig]:
    """The engine's arguments for a stored job: the one place where API hyperparameters become TrainArgs and a
    LoRAConfig. `batch_size` is the micro-batch (no accumulation), so lowering it lowers memory; checkpoints are
    spread evenly, `n_checkpoints` of them, the last at the final step."""
    from unsloth_core.lora import LoRAConfig
    from unsloth_core.trainer import TrainArgs

    hp = stored_hyperparameters(method)
    args = TrainArgs(output_dir=str(output_dir), method="dpo" if method["type"] == "dpo" else "sft",
                     num_epochs=float(hp["n_epochs"]), micro_batch_size=int(hp["batch_size"]),
                     gradient_accumulation_steps=1, learning_rate=float(hp["learning_rate"]),
                     lr_scheduler=hp["lr_scheduler"], warmup_ratio=float(hp["warmup_ratio"]),
                     max_seq_length=int(hp["max_seq_length"]), packing=bool(hp["packing"]), seed=seed,
                     beta=float(hp.get("beta", 0.1)), logging_steps=metrics_every,
                     load_in_4bit=bool(hp.get("load_in_4bit", False)),  # absent in jobs stored before it existed
                     save_steps=max(1, math.ceil(max(total_steps, 1) / int(hp["n_checkpoints"]))))
    lora = LoRAConfig(r=int(hp["lora_r"]), lora_alpha=float(hp["lora_alpha"]), lora_dropout=float(hp["lora_dropout"]),
                      target_modules=list(hp["lora_target_modules"]))
    return args, lora
