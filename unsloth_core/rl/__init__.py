"""Preference and reinforcement optimisation on top of the trainer: DPO (sigmoid loss) and GRPO.

`GRPOConfig` / `GRPOTrainer` are TRL's names (grpo_trainer.py); `GRPO` / `GRPOArgs` the method the trainer's loop
runs (grpo.py). Those load on first use: the loss functions below need only torch.
"""

import importlib
from typing import Any

from unsloth_core.rl.grpo_loss import (
    GRPOLossConfig,
    combine_rewards,
    completion_mask,
    group_advantages,
    grpo_loss,
)

_LAZY = {
    "GRPO": "unsloth_core.rl.grpo",
    "GRPOArgs": "unsloth_core.rl.grpo",
    "GRPOConfig": "unsloth_core.rl.grpo_trainer",
    "GRPOTrainer": "unsloth_core.rl.grpo_trainer",
    "DPO": "unsloth_core.rl.dpo",
}

__all__ = ["GRPOLossConfig", "combine_rewards", "completion_mask", "group_advantages", "grpo_loss", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unsloth_core.rl' has no attribute {name!r}")
