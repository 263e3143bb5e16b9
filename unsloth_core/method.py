"""A training method: what differs between SFT, DPO and GRPO, behind one interface the trainer's loop calls.

The loop (trainer.py) is shared: the data order and its position, accumulation windows, the learning-rate schedule,
clipping and the optimizer step, logging, evaluation, checkpoints, callbacks and resume. A method owns the rest:
how a data file becomes training items, how items become a batch, the loss of one accumulation window (its backward
included) and its metrics, and what evaluating means. A new method is one file with a `Method` subclass, named in
`METHODS` below.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from unsloth_core.tokenizer import Tokenizer
    from unsloth_core.trainer import TrainArgs, Trainer

# name -> "module:Class"; imported on first use, so naming a method costs nothing until it runs.
METHODS = {"sft": "unsloth_core.sft_method:SFT", "dpo": "unsloth_core.rl.dpo:DPO", "grpo": "unsloth_core.rl.grpo:GRPO"}

# Extra state a method needs to resume exactly (GRPO's rollout, reused across iterations): tensors, and JSON data.
MethodState = tuple[dict[str, Tensor], dict[str, Any]]


class Method:
    """The interface, with the defaults most methods keep. `Trainer` calls these; subclasses override."""

    name: ClassVar[str]

    @classmethod
    def from_args(cls, args: TrainArgs) -> Method:
        """The method as `args.method` names it (for methods that need nothing beyond TrainArgs)."""
        return cls()

    # ---- data: a file to training items (finetune.py) ----

    def load(self, source: str | Path, tokenizer: Tokenizer, args: TrainArgs, role: str = "training") -> list[Any]:
        """Every example of a data file; raises DataFileError (every bad line) when it does not validate."""
        raise NotImplementedError

    def tokenize(self, examples: Sequence[Any], tokenizer: Tokenizer, args: TrainArgs) -> list[Any]:
        """Training items, each with a `truncated` flag."""
        raise NotImplementedError

    def n_tokens(self, item: Any) -> int:
        raise NotImplementedError

    def finalize(self, items: list[Any], args: TrainArgs) -> list[Any]:
        """The items as the trainer takes them (SFT packs them here)."""
        return items

    # ---- the loop's shape ----

    def batch_shape(self, args: TrainArgs) -> tuple[int, int]:
        """(items per data batch, data batches per accumulation window)."""
        return args.micro_batch_size, args.gradient_accumulation_steps

    @property
    def steps_per_window(self) -> int:
        """Optimizer steps each window of data is trained for (GRPO's num_iterations)."""
        return 1

    def needs_window(self, step: int) -> bool:
        """Whether the optimizer step `step` (0-based) takes the next window of data."""
        return True

    def setup(self, trainer: Trainer) -> None:
        """Once, before the first step (after the model's dtypes are set)."""

    def collate(self, trainer: Trainer, items: list[Any]) -> Any:
        """One data batch as `train_window` takes it."""
        return items

    def train_window(self, trainer: Trainer, window: list[Any] | None) -> dict[str, Any]:
        """Forward and backward over one accumulation window (None: the previous window again); the gradients
        are left in .grad, the token counters in trainer.state advanced. Returns the step's metrics."""
        raise NotImplementedError

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Metrics over trainer.eval_data ("eval_" names); runs under no_grad with the model in eval mode."""
        raise NotImplementedError

    def eval_score(self, metrics: dict[str, float]) -> float:
        """The number early stopping and the best evaluation go by: lower is better."""
        return metrics["eval_loss"]

    # ---- resume ----

    def state_dict(self) -> MethodState | None:
        """What a checkpoint must hold beyond the trainer's state for an exact resume; None: nothing."""
        return None

    def load_state_dict(self, state: MethodState | None) -> None:
        """Restore what `state_dict` gave (None: the checkpoint held nothing for this method)."""


def method_for(args: TrainArgs) -> Method:
    """The method `args.method` names."""
    if args.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {args.method!r}")
    module, cls = METHODS[args.method].split(":")
    method: type[Method] = getattr(importlib.import_module(module), cls)
    return method.from_args(args)


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """A collated batch on the device: to a GPU from pinned memory, without blocking the host."""
    cuda = device.type == "cuda"
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) for k, v in batch.items()}
