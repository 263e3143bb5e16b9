"""Direct Preference Optimization (Rafailov et al., 2023), sigmoid loss.

A batch holds 2B rows: prompt + chosen for rows 0..B-1, prompt + rejected for rows B..2B-1, labels on the replies
only (see data.collate_preference). The reference policy is the same model with its LoRA adapters disabled (no
second copy of the weights), or a frozen copy when training all weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unsloth_core.kernels import IGNORE_INDEX
from unsloth_core.lora import disable_adapters
from unsloth_core.model import Llama


def sequence_logps(model: Llama, batch: dict[str, Tensor]) -> Tensor:
    """Sum over each row's label tokens of log p(token | prefix): (rows,) in fp32."""
    out = model(batch["input_ids"], position_ids=batch["position_ids"])
    assert out.logits is not None
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (token_logps * mask).sum(-1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, dict[str, float]]:
    """Mean of -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), and the usual DPO metrics."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "loss": float(loss.detach()),
        "rewards/chosen": float(chosen_rewards.detach().mean()),
        "rewards/rejected": float(rejected_rewards.detach().mean()),
        "rewards/accuracy": float((margin.detach() > 0).float().mean()),
        "rewards/margin": float(margin.detach().mean()),
    }
    return loss, metrics


def dpo_step(model: Llama, batch: dict[str, Tensor], beta: float, reference: Llama | None = None
             ) -> tuple[Tensor, dict[str, float]]:
    """The DPO loss of one batch (differentiable through the policy only)."""
    pairs = batch["input_ids"].size(0) // 2
    policy = sequence_logps(model, batch)
    with torch.no_grad():
        if reference is not None:
            ref = sequence_logps(reference, batch)
        else:
            with disable_adapters(model):
                ref = sequence_logps(model, batch)
    return dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta)
