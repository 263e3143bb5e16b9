"""The training loop (SFT and DPO), its arguments, and the hooks a driver (CLI, Celery worker) plugs into.

The loop reads as the algorithm: lr for this step, gradient-accumulation micro-steps whose summed token losses are
divided by the number of target tokens in the whole window (so micro batch 4 x 1 equals 1 x 4), clip, step,
zero_grad, then logging, evaluation and checkpointing as calls at the edges.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from unsloth_core.checkpoint import parse_dtype
from unsloth_core.data import IGNORE_INDEX, collate, collate_preference, iter_batches, num_batches
from unsloth_core.model import Llama
from unsloth_core.train_checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_torn,
    save_checkpoint,
)

StopRequest = Literal["cancel", "pause"] | None
Status = Literal["completed", "cancelled", "paused", "early_stopped"]


@dataclass
class TrainArgs:
    """Everything that shapes a training run. Defaults follow Unsloth's notebooks where they have one."""

    output_dir: str = "outputs"
    method: Literal["sft", "dpo"] = "sft"
    num_epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides num_epochs when set
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    learning_rate: float = 2e-4
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 3407
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on a GPU that has it
    gradient_checkpointing: bool | Literal["offload"] = False
    load_in_4bit: bool = False  # QLoRA: the frozen base's projections in NF4 (quant.py); LoRA runs only
    max_seq_length: int = 2048
    packing: bool = False
    train_on_inputs: bool = False
    beta: float = 0.1  # DPO temperature
    eval_steps: int | None = None  # evaluate every N steps (and at the end) when there is eval data
    validation_split: float = 0.0  # fraction of the training file held out when no validation file is given
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    save_steps: int | None = None  # checkpoint every N steps
    save_total_limit: int | None = None  # keep the newest K checkpoints
    logging_steps: int = 1

    def __post_init__(self) -> None:
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        checks = [
            (self.num_epochs > 0 or (self.max_steps or 0) > 0, "num_epochs or max_steps must be positive"),
            (self.max_steps is None or self.max_steps > 0, "max_steps must be positive"),
            (self.micro_batch_size >= 1, "micro_batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.max_seq_length >= 8, "max_seq_length must be at least 8"),
            (0 <= self.validation_split < 1, "validation_split must be in [0, 1)"),
            (self.beta > 0, "beta must be positive"),
            (self.logging_steps >= 1, "logging_steps must be at least 1"),
            (self.method in ("sft", "dpo"), "method must be 'sft' or 'dpo'"),
            (isinstance(self.load_in_4bit, bool), "load_in_4bit must be true or false"),
            (self.lr_scheduler in ("linear", "cosine", "constant"), "lr_scheduler must be linear, cosine or constant"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    dtype = parse_dtype(name)
    assert dtype is not None
    return dtype


def lr_at(step: int, total: int, warmup: int, base: float, kind: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then linear / cosine decay to 0 or flat."""
    if step < warmup:
        return base * (step + 1) / warmup
    if kind == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * progress))
    return base * max(0.0, 1 - progress)


class Callbacks(Protocol):
    """What a driver may observe and control. Every method is optional: subclass `TrainerCallbacks`."""

    def on_log(self, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None: ...
    def on_epoch_end(self, epoch: int) -> None: ...
    def should_stop(self) -> StopRequest: ...


class TrainerCallbacks:
    """No-op callbacks; override what you need."""

    def on_log(self, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def should_stop(self) -> StopRequest:
        return None


@dataclass
class TrainResult:
    status: Status
    step: int
    total_steps: int
    trained_tokens: int
    tokens_seen: int
    checkpoint: Path | None  # the last checkpoint written (a paused run resumes from it)
    metrics: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains `model` (LoRA-adapted or fully trainable) on tokenized examples.

    `train_data` holds `TokenizedExample`/`PackedRow`s for SFT, `TokenizedPreference`s for DPO.
    """

    def __init__(self, model: Llama, args: TrainArgs, train_data: Sequence[Any], eval_data: Sequence[Any] = (),
                 callbacks: Callbacks | None = None, pad_id: int = 0, artifact_files: dict[str, Path] | None = None,
                 base_model: str | None = None) -> None:
        if not train_data:
            raise ValueError("no training examples")
        self.model, self.args = model, args
        self.train_data, self.eval_data = list(train_data), list(eval_data)
        self.callbacks: Callbacks = callbacks or TrainerCallbacks()
        self.pad_id, self.artifact_files, self.base_model = pad_id, artifact_files or {}, base_model
        self.device = model.device
        self.compute_dtype = resolve_dtype(args.dtype, self.device)
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.batches_per_epoch = num_batches(len(self.train_data), args.micro_batch_size)
        if args.max_steps:
            self.total_steps = args.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.batches_per_epoch * args.num_epochs /
                                                args.gradient_accumulation_steps))
        self.warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio *
                                                                                  self.total_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (apply LoRA, or unfreeze for full fine-tuning)")
        self.reference: Llama | None = None  # DPO without LoRA compares against a frozen copy
        self.optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, betas=args.adam_betas,
                                           weight_decay=args.weight_decay)
        self.state = TrainerState()
        self.last_checkpoint: Path | None = None

    # ---- the loop ----

    def train(self, resume_from: str | Path | Literal["latest"] | None = None) -> TrainResult:
        self._prepare_model()
        self._resume(resume_from)
        a, s = self.args, self.state
        window_stream = self._windows()
        t0, tokens_at_t0 = time.perf_counter(), s.tokens_seen
        while s.step < self.total_steps:
            stop = self.callbacks.should_stop()
            if stop is not None:
                return self._stop(stop)
            lr = lr_at(s.step, self.total_steps, self.warmup, a.learning_rate, a.lr_scheduler)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            window = next(window_stream)
            metrics = self._train_window(window)
            grad_norm = self._clip()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            s.step += 1
            if s.step % a.logging_steps == 0 or s.step == self.total_steps:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                self._log({**metrics, "learning_rate": lr, "grad_norm": grad_norm,
                           "tokens_per_second": (s.tokens_seen - tokens_at_t0) / elapsed})
            if self._evaluate_now():
                self._evaluate()
                if self._early_stop():
                    return self._finish("early_stopped")
            if a.save_steps and s.step % a.save_steps == 0 and s.step < self.total_steps:
                self._checkpoint()
        return self._finish("completed")

    def _train_window(self, window: list[dict[str, Tensor]]) -> dict[str, Any]:
        """One optimizer step's worth of micro-batches; gradients are left in .grad."""
        self.model.train()
        if self.args.method == "dpo":
            return self._dpo_window(window)
        # The counts come from the host copies (see _collate), and the sums are read back once at the window's end:
        # a read after each micro-batch's backward would leave a GPU idle while the host queues the next forward.
        counts = [(int(mb["n_targets"]), int(mb["n_tokens"])) for mb in window]
        n_targets = sum(targets for targets, _ in counts)
        track = (self.state.step + 1) % self.args.logging_steps == 0  # accuracy (an argmax): log steps only
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for mb in window:
            with self._autocast():
                # No attention mask: batches are right-padded, so causal attention is exact for the real tokens.
                out = self.model(mb["input_ids"], position_ids=self._positions(mb), labels=mb["labels"],
                                 return_logits=False, accuracy=track)
            assert out.loss_sum is not None
            (out.loss_sum / max(n_targets, 1)).backward()
            loss_sum += out.loss_sum.detach()
            if out.n_correct is not None:
                correct += out.n_correct
        self.state.tokens_seen += sum(tokens for _, tokens in counts)
        self.state.trained_tokens += n_targets
        metrics: dict[str, Any] = {"loss": float(loss_sum) / max(n_targets, 1)}
        if track:
            metrics["mean_token_accuracy"] = int(correct) / max(n_targets, 1)
        return metrics

    def _positions(self, batch: dict[str, Tensor]) -> Tensor | None:
        """Packed rows' own positions; None for plain right-padded rows, whose positions are 0..T-1 anyway. The
        model looks for packed samples (a position 0 after the start) only when given positions: on a GPU that
        look is a host sync per micro-batch."""
        return batch["position_ids"] if self.args.packing else None

    def _dpo_window(self, window: list[dict[str, Tensor]]) -> dict[str, Any]:
        from unsloth_core.rl.dpo import dpo_step

        pairs = sum(mb["input_ids"].size(0) // 2 for mb in window)
        totals: dict[str, float] = {}
        for mb in window:
            with self._autocast():
                loss, m = dpo_step(self.model, mb, self.args.beta, self.reference)
            (loss * (mb["input_ids"].size(0) // 2) / pairs).backward()
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v * (mb["input_ids"].size(0) // 2)
            self.state.tokens_seen += int(mb["n_tokens"])
            self.state.trained_tokens += int(mb["n_targets"])
        return {k: v / pairs for k, v in totals.items()}

    def _clip(self) -> float:
        if self.args.max_grad_norm is None:
            norms = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
            return float(torch.stack(norms).norm()) if norms else 0.0
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm))

    # ---- data ----

    def _windows(self) -> Iterator[list[dict[str, Tensor]]]:
        """Micro-batches grouped by accumulation window, continuing across epochs from the recorded position."""
        window: list[dict[str, Tensor]] = []
        while True:
            s = self.state
            for items in iter_batches(self.train_data, self.args.micro_batch_size, seed=self.args.seed,
                                      epoch=s.epoch, start=s.batch_in_epoch):
                s.batch_in_epoch += 1
                window.append(self._collate(items))
                if len(window) == self.args.gradient_accumulation_steps:
                    yield window
                    window = []
            self.callbacks.on_epoch_end(s.epoch)
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            if window and s.epoch >= math.ceil(self.args.num_epochs) and not self.args.max_steps:
                yield window  # the short last window of the run
                window = []

    def _collate(self, items: list[Any]) -> dict[str, Tensor]:
        """The micro-batch on the device, plus its token counts ("n_tokens", "n_targets") kept on the host, where
        reading them costs no device sync. To a GPU the tensors go from pinned memory without blocking the host."""
        fn = collate_preference if self.args.method == "dpo" else collate
        batch = fn(items, self.pad_id)
        cuda = self.device.type == "cuda"
        out = {k: (v.pin_memory() if cuda else v).to(self.device, non_blocking=cuda) for k, v in batch.items()}
        out["n_tokens"] = batch["attention_mask"].sum()
        out["n_targets"] = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        return out

    # ---- evaluation ----

    def _evaluate_now(self) -> bool:
        a, s = self.args, self.state
        if not self.eval_data:
            return False
        return s.step == self.total_steps or bool(a.eval_steps and s.step % a.eval_steps == 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        loss_sum, n, correct = 0.0, 0, 0
        metrics: dict[str, float] = {}
        for items in iter_batches(self.eval_data, self.args.micro_batch_size, seed=0, epoch=0, shuffle=False):
            batch = self._collate(items)
            if self.args.method == "dpo":
                from unsloth_core.rl.dpo import dpo_step

                with self._autocast():
                    loss, m = dpo_step(self.model, batch, self.args.beta, self.reference)
                pairs = batch["input_ids"].size(0) // 2
                for k, v in m.items():
                    metrics[k] = metrics.get(k, 0.0) + v * pairs
                loss_sum, n = loss_sum + float(loss) * pairs, n + pairs
                continue
            with self._autocast():
                out = self.model(batch["input_ids"], position_ids=self._positions(batch), labels=batch["labels"],
                                 return_logits=False, accuracy=True)
            assert out.loss_sum is not None and out.n_tokens is not None
            loss_sum, n = loss_sum + float(out.loss_sum), n + int(out.n_tokens)
            correct += int(out.n_correct) if out.n_correct is not None else 0
        result = {"eval_loss": loss_sum / max(n, 1)}
        if self.args.method == "dpo":
            result.update({f"eval_{k}": v / max(n, 1) for k, v in metrics.items()})
        else:
            result["eval_mean_token_accuracy"] = correct / max(n, 1)
        return result

    def _evaluate(self) -> None:
        metrics = self.evaluate()
        s = self.state
        if s.best_eval_loss is None or metrics["eval_loss"] < s.best_eval_loss:
            s.best_eval_loss, s.evals_without_improvement = metrics["eval_loss"], 0
        else:
            s.evals_without_improvement += 1
        self._log(metrics)

    def _early_stop(self) -> bool:
        patience = self.args.early_stopping_patience
        return patience is not None and self.state.evals_without_improvement >= patience

    # ---- state, checkpoints, ends ----

    def _prepare_model(self) -> None:
        torch.manual_seed(self.args.seed)
        random.seed(self.args.seed)
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # trained weights are fp32 masters (a model loaded in bf16 included)
            elif not p.requires_grad and self.compute_dtype != torch.float32:
                p.data = p.data.to(self.compute_dtype)  # frozen ones in the compute dtype; autocast does the matmuls
        self.model.gradient_checkpointing = self.args.gradient_checkpointing
        if self.args.method == "dpo" and self.model.lora_config is None and self.reference is None:
            import copy

            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    def _autocast(self) -> torch.autocast:
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)

    def _resume(self, resume_from: str | Path | None) -> None:
        remove_torn(self.checkpoint_dir)
        if resume_from == "latest":
            found = list_checkpoints(self.checkpoint_dir)
            resume_from = found[-1][1] if found else None
        if resume_from is None:
            return
        self.state = load_checkpoint(Path(resume_from), self.model, self.optimizer)
        self.last_checkpoint = Path(resume_from)

    def _checkpoint(self) -> Path:
        path = save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.state, self.artifact_files,
                               self.base_model)
        self.last_checkpoint = path
        prune_checkpoints(self.checkpoint_dir, self.args.save_total_limit, protect=path)
        last = self.state.log_history[-1] if self.state.log_history else {}
        self.callbacks.on_checkpoint(path, self.state.step, last)
        return path

    def _log(self, metrics: dict[str, Any]) -> None:
        s = self.state
        epoch = s.epoch + s.batch_in_epoch / max(1, self.batches_per_epoch)
        entry = {"step": s.step, "total_steps": self.total_steps, "epoch": epoch, "tokens_seen": s.tokens_seen,
                 **metrics}
        s.log_history.append(entry)
        self.callbacks.on_log(entry)

    def _stop(self, request: Literal["cancel", "pause"]) -> TrainResult:
        if request == "pause" and self.state.step > 0:
            self._checkpoint()
        return self._result("paused" if request == "pause" else "cancelled")

    def _finish(self, status: Status) -> TrainResult:
        self._checkpoint()
        return self._result(status)

    def _result(self, status: Status) -> TrainResult:
        s = self.state
        return TrainResult(status, s.step, self.total_steps, s.trained_tokens, s.tokens_seen, self.last_checkpoint,
                           list(s.log_history))
