"""Supervised fine-tuning: next-token loss on the target tokens (replies, or everything with train_on_inputs).

The summed token losses of a window's micro-batches are divided by the number of target tokens in the whole window,
so micro batch 4 x 1 equals 1 x 4.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from unsloth_core.data import IGNORE_INDEX, collate, iter_batches, load_examples, pack, tokenize_sft
from unsloth_core.data.examples import SFTExample
from unsloth_core.method import Method, to_device

if TYPE_CHECKING:
    from unsloth_core.tokenizer import Tokenizer
    from unsloth_core.trainer import TrainArgs, Trainer


class SFT(Method):
    name = "sft"

    def __init__(self, packing: bool = False) -> None:
        self.packing = packing

    @classmethod
    def from_args(cls, args: TrainArgs) -> SFT:
        return cls(packing=args.packing)

    # ---- data ----

    def load(self, source: str | Path, tokenizer: Tokenizer, args: TrainArgs, role: str = "training") -> list[Any]:
        return load_examples(source, purpose="sft", tokenizer=tokenizer, max_seq_length=args.max_seq_length,
                             role=role)

    def tokenize(self, examples: Sequence[Any], tokenizer: Tokenizer, args: TrainArgs) -> list[Any]:
        return [tokenize_sft(e, tokenizer, args.max_seq_length, args.train_on_inputs) for e in examples
                if isinstance(e, SFTExample)]

    def n_tokens(self, item: Any) -> int:
        return len(item)

    def finalize(self, items: list[Any], args: TrainArgs) -> list[Any]:
        return pack(items, args.max_seq_length) if self.packing else items

    # ---- training ----

    def collate(self, trainer: Trainer, items: list[Any]) -> dict[str, Tensor]:
        """The micro-batch on the device, plus its token counts ("n_tokens", "n_targets") kept on the host, where
        reading them costs no device sync."""
        batch = collate(items, trainer.pad_id)
        out = to_device(batch, trainer.device)
        out["n_tokens"] = batch["attention_mask"].sum()
        out["n_targets"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return out

    def train_window(self, trainer: Trainer, window: list[Any] | None) -> dict[str, Any]:
        assert window is not None
        # The counts come from the host copies (see collate), and the sums are read back once at the window's end:
        # a read after each micro-batch's backward would leave a GPU idle while the host queues the next forward.
        counts = [(int(mb["n_targets"]), int(mb["n_tokens"])) for mb in window]
        n_targets = sum(targets for targets, _ in counts)
        track = (trainer.state.step + 1) % trainer.args.logging_steps == 0  # accuracy (an argmax): log steps only
        loss_sum = torch.zeros((), device=trainer.device)
        correct = torch.zeros((), dtype=torch.long, device=trainer.device)
        for mb in window:
            with trainer.autocast():
                # No attention mask: batches are right-padded, so causal attention is exact for the real tokens.
                out = trainer.model(mb["input_ids"], position_ids=self._positions(mb), labels=mb["labels"],
                                    return_logits=False, accuracy=track)
            assert out.loss_sum is not None
            (out.loss_sum / max(n_targets, 1)).backward()
            loss_sum += out.loss_sum.detach()
            if out.n_correct is not None:
                correct += out.n_correct
        trainer.state.tokens_seen += sum(tokens for _, tokens in counts)
        trainer.state.trained_tokens += n_targets
        metrics: dict[str, Any] = {"loss": float(loss_sum) / max(n_targets, 1)}
        if track:
            metrics["mean_token_accuracy"] = int(correct) / max(n_targets, 1)
        return metrics

    def _positions(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Packed rows' own positions; None for plain right-padded rows, whose positions are 0..T-1 anyway. The
        model looks for packed samples (a position 0 after the start) only when given positions: on a GPU that
        look is a host sync per micro-batch."""
        return batch["position_ids"] if self.packing else None

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        loss_sum, n, correct = 0.0, 0, 0
        for items in iter_batches(trainer.eval_data, trainer.args.micro_batch_size, seed=0, epoch=0, shuffle=False):
            batch = self.collate(trainer, items)
            with trainer.autocast():
                out = trainer.model(batch["input_ids"], position_ids=self._positions(batch), labels=batch["labels"],
                                    return_logits=False, accuracy=True)
            assert out.loss_sum is not None and out.n_tokens is not None
            loss_sum, n = loss_sum + float(out.loss_sum), n + int(out.n_tokens)
            correct += int(out.n_correct) if out.n_correct is not None else 0
        return {"eval_loss": loss_sum / max(n, 1), "eval_mean_token_accuracy": correct / max(n, 1)}
