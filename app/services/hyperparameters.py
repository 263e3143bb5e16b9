"""Resolving `"auto"` hyperparameters from the dataset and the model, so a job stores and echoes concrete values.

The epoch rule is OpenAI's (cookbook `Chat_finetuning_data_prep`): 3 epochs, more for small datasets (aiming at 100
examples seen), fewer for large ones (at most 25,000). The LoRA defaults are Unsloth's (r = alpha = 16, no dropout,
every linear layer).

Reinforcement jobs (GRPO) take OpenAI's hyperparameters and TRL's GRPO names in one object. OpenAI's two that have
no direct twin here map as follows, and the job echoes what they became: `compute_multiplier` scales the completions
sampled per prompt (`num_generations` = 8 x multiplier, in [2, 64]); `reasoning_effort` sets the room a completion
gets (`max_completion_length`: low 256, default or medium 512, high 1024 tokens), since an open model's reasoning is
its completion's length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from app.schemas.jobs import (
    ALL_LINEAR_MODULES,
    AnyHyperparameters,
    DPOHyperparameters,
    ReinforcementHyperparameters,
    SupervisedHyperparameters,
)

if TYPE_CHECKING:
    from unsloth_core.lora import LoRAConfig
    from unsloth_core.rl.grpo import GRPOArgs
    from unsloth_core.trainer import TrainArgs

# LoRA rates: Unsloth's SFT default; DPO's and GRPO's are smaller (their notebooks use 5e-6 for both; GRPO's signal is
# sparser than SFT's but a LoRA adapter needs more than full fine-tuning's 1e-6).
BASE_LEARNING_RATE = {"supervised": 2e-4, "dpo": 5e-6, "reinforcement": 1e-5}
DEFAULT_MAX_SEQ_LENGTH = 2048
COMPLETION_LENGTH = {"low": 256, "default": 512, "medium": 512, "high": 1024}
DEFAULT_EVAL_SAMPLES = 32
MAX_RL_BATCH = 4  # prompts per step when "auto": each is num_generations completions


def auto_epochs(n_examples: int) -> int:
    n = max(n_examples, 1)
    if n * 3 < 100:
        return min(25, math.ceil(100 / n))
    if n * 3 > 25_000:
        return max(1, 25_000 // n)
    return 3


def auto_batch_size(n_examples: int) -> int:
    return max(1, min(16, 2 ** math.floor(math.log2(max(n_examples, 1) / 100)) if n_examples >= 100 else 1))


def resolve(hp: AnyHyperparameters, *, method_type: str, n_examples: int,
            context_length: int | None) -> dict[str, Any]:
    """Every field concrete. Where an absolute `learning_rate` is given, the multiplier echoed is lr / base lr."""
    resolved = _resolve_shared(hp, method_type=method_type, n_examples=n_examples, context_length=context_length)
    if isinstance(hp, SupervisedHyperparameters):
        resolved["packing"] = _pick(hp.packing, False)
        resolved["eval_graders"] = list(hp.eval_graders or [])  # as the plan validated them (jobs.py)
        resolved["eval_samples"] = _pick(hp.eval_samples, DEFAULT_EVAL_SAMPLES)
    if isinstance(hp, DPOHyperparameters):
        resolved["beta"] = _pick(hp.beta, 0.1)
    if isinstance(hp, ReinforcementHyperparameters):
        resolved.update(_resolve_reinforcement(hp, resolved, n_examples))
    return resolved


def _pick(value: Any, default: Any) -> Any:
    return default if value == "auto" else value


def _resolve_shared(hp: AnyHyperparameters, *, method_type: str, n_examples: int,
                    context_length: int | None) -> dict[str, Any]:
    base_lr = BASE_LEARNING_RATE.get(method_type, BASE_LEARNING_RATE["supervised"])
    n_epochs = _pick(hp.n_epochs, auto_epochs(n_examples))
    if hp.learning_rate != "auto":
        learning_rate = float(hp.learning_rate)
        multiplier = learning_rate / base_lr
    else:
        multiplier = float(_pick(hp.learning_rate_multiplier, 1.0))
        learning_rate = base_lr * multiplier
    lora_r = _pick(hp.lora_r, 16)
    targets = hp.lora_target_modules
    max_len = context_length or DEFAULT_MAX_SEQ_LENGTH
    batch_size = auto_batch_size(n_examples)
    if isinstance(hp, ReinforcementHyperparameters):
        batch_size = min(batch_size, MAX_RL_BATCH)
    return {
        "n_epochs": n_epochs,
        "batch_size": _pick(hp.batch_size, batch_size),
        "learning_rate_multiplier": multiplier,
        "learning_rate": learning_rate,
        "lora_r": lora_r,
        "lora_alpha": _pick(hp.lora_alpha, lora_r),
        "lora_dropout": _pick(hp.lora_dropout, 0.0),
        "lora_target_modules": list(ALL_LINEAR_MODULES) if targets in ("auto", "all-linear") else list(targets),
        "lr_scheduler": _pick(hp.lr_scheduler, "linear"),
        "warmup_ratio": _pick(hp.warmup_ratio, 0.03),
        "max_seq_length": _pick(hp.max_seq_length, min(DEFAULT_MAX_SEQ_LENGTH, max_len)),
        "n_checkpoints": _pick(hp.n_checkpoints, min(3, n_epochs)),
        "load_in_4bit": _pick(hp.load_in_4bit, False),
        "probe_prompts": _pick(_probes(hp.probe_prompts), "validation"),
    }


def _probes(value: Any) -> Any:
    return [p if isinstance(p, str) else [m.model_dump() for m in p] for p in value] if isinstance(value, list) \
        else value


def _resolve_reinforcement(hp: ReinforcementHyperparameters, shared: dict[str, Any],
                           n_examples: int) -> dict[str, Any]:
    multiplier = float(_pick(hp.compute_multiplier, 1.0))
    generations = max(2, min(64, round(8 * multiplier)))
    # The prompt needs room too: a completion gets at most three quarters of the sequence.
    room = max(1, shared["max_seq_length"] * 3 // 4)
    steps = estimate_steps(shared, n_examples=n_examples, n_tokens=None)
    return {
        "compute_multiplier": multiplier,
        "reasoning_effort": hp.reasoning_effort,
        "num_generations": _pick(hp.num_generations, generations),
        "max_completion_length": _pick(hp.max_completion_length, min(COMPLETION_LENGTH[hp.reasoning_effort], room)),
        "temperature": _pick(hp.temperature, 1.0),
        "top_p": _pick(hp.top_p, 1.0),
        "beta": _pick(hp.beta, 0.0),
        "loss_type": _pick(hp.loss_type, "dapo"),
        "eval_interval": _pick(hp.eval_interval, checkpoint_interval(steps, shared["n_checkpoints"])),
        "eval_samples": _pick(hp.eval_samples, DEFAULT_EVAL_SAMPLES),
    }


def checkpoint_interval(total_steps: int, n_checkpoints: int) -> int:
    """Steps between checkpoints: `n_checkpoints` spread evenly, the last at the final step."""
    return max(1, math.ceil(max(total_steps, 1) / n_checkpoints))


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
    spread evenly, `n_checkpoints` of them, the last at the final step. A reinforcement step takes `batch_size`
    prompts, one group of `num_generations` completions per micro-batch, and evaluates every `eval_interval`
    steps."""
    from unsloth_core.lora import LoRAConfig
    from unsloth_core.trainer import TrainArgs

    hp = stored_hyperparameters(method)
    kind = method["type"]
    rl = kind == "reinforcement"
    engine_method: Literal["sft", "dpo", "grpo"] = "grpo" if rl else "dpo" if kind == "dpo" else "sft"
    args = TrainArgs(output_dir=str(output_dir), method=engine_method,
                     num_epochs=float(hp["n_epochs"]),
                     micro_batch_size=int(hp["num_generations"] if rl else hp["batch_size"]),
                     gradient_accumulation_steps=int(hp["batch_size"]) if rl else 1,
                     learning_rate=float(hp["learning_rate"]),
                     lr_scheduler=hp["lr_scheduler"], warmup_ratio=float(hp["warmup_ratio"]),
                     max_seq_length=int(hp["max_seq_length"]), packing=bool(hp.get("packing", False)), seed=seed,
                     beta=0.1 if rl else float(hp.get("beta", 0.1)), logging_steps=metrics_every,  # GRPO: GRPOArgs
                     load_in_4bit=bool(hp.get("load_in_4bit", False)),  # absent in jobs stored before it existed
                     # with a validation file, every checkpoint is evaluated on all of it (RL: every eval_interval)
                     eval_steps=int(hp["eval_interval"]) if rl else checkpoint_interval(total_steps,
                                                                                        int(hp["n_checkpoints"])),
                     save_steps=checkpoint_interval(total_steps, int(hp["n_checkpoints"])),
                     probe_prompts=_probe_prompts(hp.get("probe_prompts", "validation")))
    lora = LoRAConfig(r=int(hp["lora_r"]), lora_alpha=float(hp["lora_alpha"]), lora_dropout=float(hp["lora_dropout"]),
                      target_modules=list(hp["lora_target_modules"]))
    return args, lora


def _probe_prompts(value: Any) -> list[Any] | None:
    """None: the engine takes the first validation prompts; else the user's (OpenAI's `developer` is `system` to
    open models' chat templates)."""
    if value == "validation":
        return None
    return [p if isinstance(p, str) else [{**m, "role": "system" if m["role"] == "developer" else m["role"]}
                                          for m in p] for p in value]


def grpo_args(method: dict[str, Any], *, log_rollouts: int) -> GRPOArgs:
    """GRPO's own arguments for a stored reinforcement job."""
    from unsloth_core.rl.grpo import GRPOArgs

    hp = stored_hyperparameters(method)
    return GRPOArgs(num_generations=int(hp["num_generations"]),
                    max_completion_length=int(hp["max_completion_length"]), temperature=float(hp["temperature"]),
                    top_p=float(hp["top_p"]), beta=float(hp["beta"]), loss_type=hp["loss_type"],
                    eval_samples=int(hp["eval_samples"]), log_rollouts=log_rollouts)
