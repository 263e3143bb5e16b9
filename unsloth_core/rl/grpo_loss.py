"""The GRPO objective (Shao et al., 2024): group-normalised advantages and the clipped per-token policy loss.

Rows are completions, G per prompt and a prompt's G rows adjacent (rows g*G .. g*G+G-1 share prompt g). Each row's
advantage is its reward less its group's mean, divided by a standard deviation (`scale_rewards`: the group's, the
whole batch's, or none, as Dr. GRPO recommends). Every completion token then carries its row's advantage A, and the
loss per token is PPO's clipped surrogate

    -min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),    r = exp(logp - logp_old)

plus beta times the k3 estimate of KL(policy || reference), exp(ref - logp) - (ref - logp) - 1 (Schulman, 2020),
which is unbiased and never negative (times r by default: `use_bias_correction_kl`). With one optimiser step per
batch (`num_iterations` 1) logp_old is logp detached, so r = 1 in value and only its gradient (that of logp) counts.

The variants differ only in how token losses are averaged (TRL's names and normalisations):
  grpo      each row's mean over its tokens, then the mean over rows (short rows weigh more per token);
  bnpo      the mean over the batch's tokens;
  dr_grpo   the sum over tokens divided by rows * max_completion_length (a constant: no length bias);
  dapo      the sum over tokens divided by the tokens of the whole accumulation window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
ScaleRewards = Literal["group", "batch", "none"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
SCALE_REWARDS: tuple[str, ...] = get_args(ScaleRewards)
# Added to the standard deviation so that a group whose rewards are all equal gets advantages of 0, not 0/0.
STD_EPS = 1e-4


@dataclass(frozen=True)
class GRPOLossConfig:
    """The loss's knobs, named as TRL's GRPOConfig names them. `epsilon_high` None: the same as `epsilon`."""

    loss_type: LossType = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    max_completion_length: int | None = None  # dr_grpo's constant denominator
    # Weigh each token's KL by its ratio r (DeepSeek-V3.2): its gradient is then the unbiased reverse-KL gradient
    # when the batch is reused. It changes the gradient even at r = 1 (r's gradient is logp's). TRL's default.
    use_bias_correction_kl: bool = True

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0; got {self.beta}")
        if not 0 <= self.epsilon < 1:
            raise ValueError(f"epsilon must be in [0, 1); got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            raise ValueError(f"epsilon_high must be >= 0; got {self.epsilon_high}")
        if self.loss_type == "dr_grpo" and (self.max_completion_length or 0) < 1:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length (a positive int): it divides by it")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def upper_epsilon(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def combine_rewards(rewards_per_func: Tensor, weights: Tensor | None = None) -> Tensor:
    """(rows, funcs) rewards, NaN where a function returned None, to one reward per row: the weighted sum of the
    functions that scored the row, NaN where none did (such a row is left out of its group's statistics)."""
    if weights is None:
        weights = torch.ones(rewards_per_func.size(1), dtype=rewards_per_func.dtype, device=rewards_per_func.device)
    rewards = (rewards_per_func * weights).nansum(dim=1)
    return rewards.masked_fill(rewards_per_func.isnan().all(dim=1), float("nan"))


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased standard deviation over the non-NaN values (NaN where fewer than two)."""
    count = (~x.isnan()).sum() if dim is None else (~x.isnan()).sum(dim)
    mean = x.nanmean() if dim is None else x.nanmean(dim, keepdim=True)
    squares = ((x - mean) ** 2).nansum() if dim is None else ((x - mean) ** 2).nansum(dim)
    return (squares / (count - 1)).sqrt()


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: ScaleRewards = "group") -> Tensor:
    """Each row's reward less its group's mean, over a standard deviation (see the module docstring). Rows with a
    NaN reward (unscorable) get advantage 0. rewards: (groups * num_generations,); returns the same shape."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {scale_rewards!r}")
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(f"num_generations ({num_generations}) must divide the number of rewards ({rewards.numel()})")
    grouped = rewards.view(-1, num_generations)
    advantages = (grouped - grouped.nanmean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group" and num_generations > 1:
        advantages = advantages / (nanstd(grouped, dim=1).repeat_interleave(num_generations) + STD_EPS)
    elif scale_rewards == "batch" and rewards.numel() > 1:
        advantages = advantages / (nanstd(rewards) + STD_EPS)
    elif scale_rewards != "none":
        advantages = advantages / STD_EPS  # one row: its advantage is 0 already
    return advantages.nan_to_num(nan=0.0)


def completion_mask(lengths: Tensor, width: int, truncated: Tensor | None = None) -> Tensor:
    """(rows, width) 1.0 on each row's first `lengths` tokens; rows flagged `truncated` (ended by the length limit,
    not by EOS: mask_truncated_completions) are all 0, so a cut-off answer is neither rewarded nor punished."""
    mask = (torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]).float()
    if truncated is not None:
        mask = mask * (~truncated).float()[:, None]
    return mask


def _k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    delta = ref_logps - logps
    return delta.exp() - delta - 1


def _clip_metrics(ratio: Tensor, advantages: Tensor, mask: Tensor, config: GRPOLossConfig) -> dict[str, float]:
    """The share of completion tokens whose ratio the clip stopped (low: on negative advantages, high: positive)."""
    low = (ratio < 1 - config.epsilon_low) & (advantages < 0)
    high = (ratio > 1 + config.upper_epsilon) & (advantages > 0)
    tokens = mask.sum().clamp(min=1.0)
    return {"clip_ratio/low_mean": float((low * mask).sum() / tokens),
            "clip_ratio/high_mean": float((high * mask).sum() / tokens),
            "clip_ratio/region_mean": float(((low | high) * mask).sum() / tokens)}


def _reduce(per_token: Tensor, mask: Tensor, config: GRPOLossConfig, accumulation_steps: float,
            window_tokens: Tensor | float | None) -> Tensor:
    """Average the token losses as `config.loss_type` says, scaled so that summing over an accumulation window's
    micro-batches gives the window's loss."""
    masked = per_token * mask
    if config.loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif config.loss_type == "bnpo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    elif config.loss_type == "dr_grpo":
        assert config.max_completion_length is not None  # checked by the config
        loss = masked.sum() / (per_token.size(0) * config.max_completion_length)
    else:  # dapo: every token of the window weighs the same, so divide by the window's count, not the micro-batch's
        if window_tokens is None:
            if accumulation_steps != 1:
                raise ValueError("loss_type 'dapo' with accumulation_steps > 1 needs window_tokens, the number of "
                                 "completion tokens in the whole accumulation window")
            window_tokens = mask.sum()
        return masked.sum() / torch.as_tensor(window_tokens, dtype=masked.dtype).clamp(min=1.0)
    return loss / accumulation_steps


def grpo_loss(logps: Tensor, advantages: Tensor, mask: Tensor, config: GRPOLossConfig, *,
              old_logps: Tensor | None = None, ref_logps: Tensor | None = None, accumulation_steps: float = 1,
              window_tokens: Tensor | float | None = None) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss of one micro-batch, and its metrics (kl as weighed in the loss, clip ratios).

    logps: (rows, T) log p(token) of the completion tokens under the policy being trained (differentiable);
    advantages: (rows,); mask: (rows, T) 1.0 on the tokens that count (see `completion_mask`);
    old_logps: the same under the policy that sampled them (None: logps detached, the `num_iterations` 1 case);
    ref_logps: under the reference policy, needed when config.beta > 0;
    accumulation_steps: micro-batches per optimiser step (for a short micro-batch, the window's rows over its own:
    the losses then sum to the window's); window_tokens: for dapo, the window's completion tokens.
    """
    if logps.shape != mask.shape or advantages.shape != logps.shape[:1]:
        raise ValueError(f"logps {tuple(logps.shape)}, mask {tuple(mask.shape)} and advantages "
                         f"{tuple(advantages.shape)} must be (rows, T), (rows, T) and (rows,)")
    if config.beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs ref_logps, the reference policy's log-probabilities")
    old = logps.detach() if old_logps is None else old_logps
    ratio = (logps - old).exp()
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - config.epsilon_low, 1 + config.upper_epsilon)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics = _clip_metrics(ratio.detach(), adv, mask, config)
    if config.beta > 0:
        assert ref_logps is not None
        kl = _k3_kl(logps, ref_logps)
        if config.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + config.beta * kl
        metrics["kl"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1.0))
    loss = _reduce(per_token, mask, config, accumulation_steps, window_tokens)
    return loss, metrics
