"""Preference and reinforcement optimisation on top of the trainer: DPO (sigmoid loss) and the GRPO objective."""

from unsloth_core.rl.grpo_loss import (
    GRPOLossConfig,
    combine_rewards,
    completion_mask,
    group_advantages,
    grpo_loss,
)

__all__ = ["GRPOLossConfig", "combine_rewards", "completion_mask", "group_advantages", "grpo_loss"]
