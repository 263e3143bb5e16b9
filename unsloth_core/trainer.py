"""The training loop every method shares, its arguments, and the hooks a driver (CLI, Celery worker) plugs into.

The loop reads as the algorithm: lr for this step, one accumulation window's forward and backward (the method's:
SFT in sft_method.py, DPO and GRPO in rl/), clip, step, zero_grad, then logging, evaluation and checkpointing as
calls at the edges. What a method is and owns: method.py.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch

from unsloth_core.checkpoint import parse_dtype
from unsloth_core.data import iter_batches, num_batches
from unsloth_core.method import METHODS, Method, method_for
from unsloth_core.model import Llama
from unsloth_core.quant import keep_dense
from unsloth_core.train_checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    load_method_state,
    prune_checkpoints,
    remove_torn,
    save_checkpoint,
)

if TYPE_CHECKING:
    from unsloth_core.graded_eval import GradedEval
    from unsloth_core.probes import Probes
    from unsloth_core.tool_call_check import ToolCallCheck

StopRequest = Literal["cancel", "pause"] | None
Status = Literal["completed", "cancelled", "paused", "early_stopped"]


@dataclass
class TrainArgs:
    """Everything that shapes a training run. Defaults follow Unsloth's notebooks where they have one."""

    output_dir: str = "outputs"
    method: Literal["sft", "dpo", "grpo"] = "sft"  # grpo: give the Trainer its method (rl.grpo.GRPO)
    num_epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides num_epochs when set
    micro_batch_size: int = 2  # rows per micro-batch: examples, preference pairs, or GRPO's completions
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
    # Prompts answered greedily at each checkpoint (probes.py): None takes the first `n_probes` held-out prompts
    probe_prompts: list[Any] | None = None
    n_probes: int = 3
    probe_max_tokens: int = 64
    # Tool-use turns of the job's data (validation first) checked at each checkpoint (tool_call_check.py); 0: never
    tool_call_turns: int = 16

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
            (self.tool_call_turns >= 0, "tool_call_turns must be 0 or more"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
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


@runtime_checkable
class RolloutCallbacks(Protocol):
    """Callbacks that also take an RL method's sampled rollouts (opt-in: a driver without it is never called)."""

    def on_rollouts(self, step: int, rollouts: list[dict[str, Any]]) -> None: ...


class TrainerCallbacks:
    """No-op callbacks; override what you need."""

    def on_log(self, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def on_rollouts(self, step: int, rollouts: list[dict[str, Any]]) -> None:
        """RL methods: a few sampled rollouts of the step about to be logged (see rl.grpo.GRPO for the shape)."""

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
    """Trains `model` (LoRA-adapted or fully trainable) with a method on its training items.

    `train_data` holds what the method's `tokenize` makes: `TokenizedExample`/`PackedRow`s for SFT,
    `TokenizedPreference`s for DPO, `PromptExample`s for GRPO. `method` None: the one `args.method` names (GRPO
    needs its reward functions, so it is always given).
    """

    def __init__(self, model: Llama, args: TrainArgs, train_data: Sequence[Any], eval_data: Sequence[Any] = (),
                 callbacks: Callbacks | None = None, pad_id: int = 0, artifact_files: dict[str, Path] | None = None,
                 base_model: str | None = None, method: Method | None = None, probes: Probes | None = None,
                 graded_eval: GradedEval | None = None, tool_check: ToolCallCheck | None = None) -> None:
        if not train_data:
            raise ValueError("no training examples")
        self.method = method or method_for(args)
        if self.method.name != args.method:
            raise ValueError(f"args.method is {args.method!r} but the method given is {self.method.name!r}")
        self.model, self.args = model, args
        self.train_data, self.eval_data = list(train_data), list(eval_data)
        self.callbacks: Callbacks = callbacks or TrainerCallbacks()
        self.pad_id, self.artifact_files, self.base_model = pad_id, artifact_files or {}, base_model
        self.probes, self.graded_eval, self.tool_check = probes, graded_eval, tool_check
        self.device = model.device
        self.compute_dtype = resolve_dtype(args.dtype, self.device)
        self.output_dir = Path(args.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.batch_items, self.batches_per_window = self.method.batch_shape(args)
        self.batches_per_epoch = num_batches(len(self.train_data), self.batch_items)
        if args.max_steps:
            self.total_steps = args.max_steps
        else:
            windows = max(1, math.ceil(self.batches_per_epoch * args.num_epochs / self.batches_per_window))
            self.total_steps = windows * self.method.steps_per_window
        self.warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio *
                                                                                  self.total_steps)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (apply LoRA, or unfreeze for full fine-tuning)")
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
            window = next(window_stream) if self.method.needs_window(s.step) else None
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

    def _train_window(self, window: list[Any] | None) -> dict[str, Any]:
        """One optimizer step's worth of micro-batches; gradients are left in .grad."""
        self.model.train()
        return self.method.train_window(self, window)

    def _clip(self) -> float:
        if self.args.max_grad_norm is None:
            norms = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
            return float(torch.stack(norms).norm()) if norms else 0.0
        return float(torch.nn.utils.clip_grad_norm_(self.params, self.args.max_grad_norm))

    # ---- data ----

    def _windows(self) -> Iterator[list[Any]]:
        """Data batches grouped by accumulation window, continuing across epochs from the recorded position."""
        window: list[Any] = []
        while True:
            s = self.state
            for items in iter_batches(self.train_data, self.batch_items, seed=self.args.seed,
                                      epoch=s.epoch, start=s.batch_in_epoch):
                s.batch_in_epoch += 1
                window.append(self.method.collate(self, items))
                if len(window) == self.batches_per_window:
                    yield window
                    window = []
            self.callbacks.on_epoch_end(s.epoch)
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            if window and s.epoch >= math.ceil(self.args.num_epochs) and not self.args.max_steps:
                yield window  # the short last window of the run
                window = []

    # ---- evaluation ----

    def _evaluate_now(self) -> bool:
        a, s = self.args, self.state
        if not self.eval_data:
            return False
        return s.step == self.total_steps or bool(a.eval_steps and s.step % a.eval_steps == 0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()
        try:
            metrics = self.method.evaluate(self)
            if self.graded_eval is not None:  # graders over greedy answers (SFT/DPO: GRPO's evaluation samples)
                metrics.update(self.graded_eval.run(self.model))
            return metrics
        finally:
            self.model.train(was_training)

    def _evaluate(self) -> None:
        metrics = self.evaluate()
        s, score = self.state, self.method.eval_score(metrics)
        if s.best_eval_loss is None or score < s.best_eval_loss:
            s.best_eval_loss, s.evals_without_improvement = score, 0
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
        keep_dense(self.model, False)  # a model trained after for_inference without for_training: 4-bit footprint
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # trained weights are fp32 masters (a model loaded in bf16 included)
            elif not p.requires_grad and self.compute_dtype != torch.float32:
                p.data = p.data.to(self.compute_dtype)  # frozen ones in the compute dtype; autocast does the matmuls
        self.model.gradient_checkpointing = self.args.gradient_checkpointing
        self.method.setup(self)

    def autocast(self) -> torch.autocast:
        """The compute dtype's autocast (off in fp32), for the methods' forwards."""
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
        self.method.load_state_dict(load_method_state(Path(resume_from)))
        self.last_checkpoint = Path(resume_from)

    def _checkpoint(self) -> Path:
        path = save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.state, self.artifact_files,
                               self.base_model, method_state=self.method.state_dict())
        self.last_checkpoint = path
        prune_checkpoints(self.checkpoint_dir, self.args.save_total_limit, protect=path)
        last = self.state.log_history[-1] if self.state.log_history else {}
        if self.probes is not None:  # greedy, in eval mode: no random draw, so training goes on as without them
            last = {**last, "samples": self.probes.run(self.model)}
        if self.tool_check is not None:  # greedy too
            last = {**last, **self.tool_check.run(self.model)}
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
