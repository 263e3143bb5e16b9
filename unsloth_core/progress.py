"""A command-line progress bar for training: loss, tokens/s and ETA, as trainer callbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from unsloth_core.trainer import TrainerCallbacks


class ProgressBar(TrainerCallbacks):
    def __init__(self) -> None:
        self.bar: tqdm[Any] | None = None

    def on_log(self, metrics: dict[str, Any]) -> None:
        total = metrics.get("total_steps")
        if self.bar is None:
            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, desc="training")
        shown = ("loss", "eval_loss", "learning_rate")
        postfix: dict[str, str] = {k: f"{metrics[k]:.4g}" for k in shown if k in metrics}
        if "tokens_per_second" in metrics:
            postfix["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        if "eval_loss" not in metrics:
            self.bar.update(metrics["step"] - self.bar.n)

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.write(f"checkpoint {step}: {path}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
