"""Direct Preference Optimization (Rafailov et al., 2023), sigmoid loss.

A batch holds 2B rows: prompt + chosen for rows 0..B-1, prompt + rejected for rows B..2B-1, labels on the replies
only (see data.collate_preference). The reference policy is the same model with its LoRA adapters disabled (no
second copy of the weights), or with the adapter it continues swapped in (lora.reference_policy), or a frozen copy
when training all weights.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unsloth_core.data import (
    PreferenceExample,
    collate_preference,
    iter_batches,
    load_examples,
    tokenize_preference,
)
from unsloth_core.kernels import IGNORE_INDEX
from unsloth_core.lora import reference_policy
from unsloth_core.method import Method, to_device
from unsloth_core.model import Llama

if TYPE_CHECKING:
    from unsloth_core.tokenizer import Tokenizer
    from unsloth_core.trainer import TrainArgs, Trainer


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
            with reference_policy(model):
                ref = sequence_logps(model, batch)
    return dpo_loss(policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], beta)


class DPO(Method):
    """DPO as a training method: preference pairs in, the sigmoid loss averaged over the window's pairs."""

    name = "dpo"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = beta
        self.reference: Llama | None = None  # a frozen copy, when training all weights (no adapters to disable)

    @classmethod
    def from_args(cls, args: TrainArgs) -> DPO:
        return cls(beta=args.beta)

    # ---- data ----

    def load(self, source: str | Path, tokenizer: Tokenizer, args: TrainArgs, role: str = "training") -> list[Any]:
        return load_examples(source, purpose="dpo", tokenizer=tokenizer, max_seq_length=args.max_seq_length,
                             role=role)

    def tokenize(self, examples: Sequence[Any], tokenizer: Tokenizer, args: TrainArgs) -> list[Any]:
        return [tokenize_preference(e, tokenizer, args.max_seq_length) for e in examples
                if isinstance(e, PreferenceExample)]

    def n_tokens(self, item: Any) -> int:
        return sum(len(ids) for ids in item)

    # ---- training ----

    def setup(self, trainer: Trainer) -> None:
        if trainer.model.lora_config is None and self.reference is None:
            self.reference = copy.deepcopy(trainer.model).eval().requires_grad_(False)

    def collate(self, trainer: Trainer, items: list[Any]) -> dict[str, Tensor]:
        batch = collate_preference(items, trainer.pad_id)
        out = to_device(batch, trainer.device)
        out["n_tokens"] = batch["attention_mask"].sum()
        out["n_targets"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return out

    def train_window(self, trainer: Trainer, window: list[Any] | None) -> dict[str, Any]:
        assert window is not None
        pairs = sum(mb["input_ids"].size(0) // 2 for mb in window)
        totals: dict[str, float] = {}
        for mb in window:
            n = mb["input_ids"].size(0) // 2
            with trainer.autocast():
                loss, m = dpo_step(trainer.model, mb, self.beta, self.reference)
            (loss * n / pairs).backward()
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v * n
            trainer.state.tokens_seen += int(mb["n_tokens"])
            trainer.state.trained_tokens += int(mb["n_targets"])
        return {k: v / pairs for k, v in totals.items()}

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        totals: dict[str, float] = {}
        loss_sum, n = 0.0, 0
        for items in iter_batches(trainer.eval_data, trainer.args.micro_batch_size, seed=0, epoch=0, shuffle=False):
            batch = self.collate(trainer, items)
            with trainer.autocast():
                loss, m = dpo_step(trainer.model, batch, self.beta, self.reference)
            pairs = batch["input_ids"].size(0) // 2
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v * pairs
            loss_sum, n = loss_sum + float(loss) * pairs, n + pairs
        return {"eval_loss": loss_sum / max(n, 1), **{f"eval_{k}": v / max(n, 1) for k, v in totals.items()}}
