"""`GRPOConfig` and `GRPOTrainer` with TRL's names, so a TRL or Unsloth GRPO notebook ports unchanged:

    model, tokenizer = FastLanguageModel.from_pretrained("smollm2-135m-instruct", max_seq_length=1024)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32)
    trainer = GRPOTrainer(model=model, reward_funcs=[correct, formatted], processing_class=tokenizer,
                          args=GRPOConfig(output_dir="out", num_generations=8, max_completion_length=256,
                                          learning_rate=5e-6, max_steps=100),
                          train_dataset=dataset)               # rows with "prompt" (text or messages) + fields
    trainer.train()

What we honour is the subset of TRL's arguments listed as GRPOConfig's fields; a few more are accepted at the
value that means "off" (`use_vllm=False`, `report_to`, ...). Any other argument, or another value of those, is
refused by name: nothing is silently ignored. Rollouts come from our own engine on the live weights, so vLLM
settings have nothing to configure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unsloth_core.model import Llama
from unsloth_core.rl.grpo import GRPO, GRPOArgs
from unsloth_core.rl.grpo_loss import LossType, ScaleRewards
from unsloth_core.rl.prompts import prompt_examples
from unsloth_core.rl.rewards import RewardFunc
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.trainer import (
    Callbacks,
    RolloutCallbacks,
    StopRequest,
    TrainArgs,
    Trainer,
    TrainerCallbacks,
    TrainResult,
)


@dataclass
class _GRPOFields:
    # transformers' TrainingArguments (TRL's defaults for GRPO where it sets its own)
    output_dir: str = "trainer_output"
    learning_rate: float = 1e-6
    per_device_train_batch_size: int = 8  # completions per micro-batch
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    seed: int = 42
    bf16: bool | None = None  # None: bf16 on a GPU that has it, else fp32
    fp16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_strategy: Literal["steps", "no"] = "steps"
    save_steps: int = 500
    save_total_limit: int | None = None
    eval_strategy: Literal["no", "steps"] = "no"
    eval_steps: int | None = None
    # TRL's GRPOConfig
    num_generations: int = 8
    max_completion_length: int = 512
    max_prompt_length: int | None = None  # older TRL's; None: the model's context less the completion
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: LossType = "dapo"
    scale_rewards: ScaleRewards | bool = "group"  # True: "group", False: "none" (TRL's older spelling)
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True
    reward_weights: list[float] | None = None
    # ours
    max_seq_length: int | None = None  # None: max_prompt_length + max_completion_length, or the model's
    log_rollouts: int = 2  # prompts with their completions handed to on_rollouts per logged step


# TRL / transformers arguments accepted only at the value that turns them off, or that changes nothing here.
NEUTRAL: dict[str, Any] = {
    "use_vllm": False, "push_to_hub": False, "remove_unused_columns": False, "shuffle_dataset": True,
    "disable_dropout": False, "sync_ref_model": False, "log_completions": False, "use_liger_kernel": False,
    "ddp_find_unused_parameters": None, "deepspeed": None, "fsdp": "", "torch_compile": False,
    "optim": "adamw_torch", "generation_batch_size": None, "steps_per_generation": None, "delta": None,
    "importance_sampling_level": "token", "top_entropy_quantile": 1.0, "model_init_kwargs": None,
}
# Accepted with any value: where logs go and what the run is called (we report through callbacks).
IGNORED = {"report_to", "logging_dir", "run_name", "logging_strategy", "overwrite_output_dir", "do_train",
           "dataloader_num_workers", "save_only_model", "num_completions_to_print"}


class GRPOConfig(_GRPOFields):
    """TRL's GRPOConfig, the arguments we honour (see the module docstring); unknown ones are refused by name."""

    def __init__(self, **kwargs: Any) -> None:
        for name in [k for k in kwargs if k in IGNORED]:
            kwargs.pop(name)
        for name in [k for k in kwargs if k in NEUTRAL]:
            value = kwargs.pop(name)
            if value != NEUTRAL[name] and not (name == "optim" and value in ("adamw_torch_fused", "adamw_hf")):
                raise ValueError(f"GRPOConfig: {name}={value!r} is not supported (only {NEUTRAL[name]!r}); "
                                 "rollouts run in this library's own engine on the weights being trained")
        known = {f.name for f in dataclasses.fields(_GRPOFields)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"GRPOConfig got unsupported argument(s): {', '.join(unknown)}; supported: "
                            f"{', '.join(sorted(known))}")
        super().__init__(**kwargs)

    def grpo_args(self) -> GRPOArgs:
        scale = self.scale_rewards
        return GRPOArgs(num_generations=self.num_generations, max_completion_length=self.max_completion_length,
                        max_prompt_length=self.max_prompt_length, temperature=self.temperature, top_p=self.top_p,
                        top_k=self.top_k, min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty,
                        beta=self.beta, epsilon=self.epsilon, epsilon_high=self.epsilon_high,
                        loss_type=self.loss_type, num_iterations=self.num_iterations,
                        scale_rewards="group" if scale is True else "none" if scale is False else scale,
                        mask_truncated_completions=self.mask_truncated_completions,
                        use_bias_correction_kl=self.use_bias_correction_kl, reward_weights=self.reward_weights,
                        log_rollouts=self.log_rollouts)

    def train_args(self, model: Llama) -> TrainArgs:
        if self.bf16 and self.fp16:
            raise ValueError("GRPOConfig: bf16 and fp16 cannot both be set")
        dtype = "bfloat16" if self.bf16 else "float16" if self.fp16 else "float32" if self.bf16 is False else "auto"
        context = self.max_seq_length or (self.max_prompt_length + self.max_completion_length
                                          if self.max_prompt_length else None)
        context = context or model.max_seq_length or model.config.max_position_embeddings
        scheduler = "constant" if self.lr_scheduler_type == "constant_with_warmup" else self.lr_scheduler_type
        return TrainArgs(output_dir=self.output_dir, method="grpo", num_epochs=self.num_train_epochs,
                         max_steps=self.max_steps if self.max_steps > 0 else None,
                         micro_batch_size=self.per_device_train_batch_size,
                         gradient_accumulation_steps=self.gradient_accumulation_steps,
                         learning_rate=self.learning_rate, lr_scheduler=scheduler,
                         warmup_ratio=self.warmup_ratio, warmup_steps=self.warmup_steps or None,
                         weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm or None,
                         adam_betas=(self.adam_beta1, self.adam_beta2), seed=self.seed,
                         dtype=dtype,  # type: ignore[arg-type]
                         gradient_checkpointing=self.gradient_checkpointing, max_seq_length=context,
                         logging_steps=self.logging_steps,
                         save_steps=self.save_steps if self.save_strategy == "steps" else None,
                         save_total_limit=self.save_total_limit,
                         eval_steps=self.eval_steps if self.eval_strategy == "steps" else None)


class GRPOTrainer:
    """TRL's GRPOTrainer over our loop: `model` (ours, LoRA-adapted by get_peft_model or fully trainable),
    `reward_funcs` (callables in TRL's signature, see rl/rewards.py), `train_dataset` (rows with a `prompt` or
    `messages`, as a list of dicts or a `datasets.Dataset`), `processing_class` (the tokenizer). `callbacks`: our
    TrainerCallbacks (on_log, on_checkpoint, on_rollouts, should_stop)."""

    def __init__(self, model: Llama, reward_funcs: RewardFunc | Sequence[RewardFunc], args: GRPOConfig | None = None,
                 train_dataset: Iterable[Mapping[str, Any]] | None = None,
                 eval_dataset: Iterable[Mapping[str, Any]] | None = None, processing_class: Tokenizer | None = None,
                 callbacks: Sequence[Callbacks] | None = None, peft_config: Any = None, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"GRPOTrainer got unsupported argument(s): {', '.join(sorted(kwargs))}")
        if not isinstance(model, Llama):
            raise TypeError("GRPOTrainer takes a loaded model: FastLanguageModel.from_pretrained(...) (and "
                            "get_peft_model for LoRA), not a name")
        if peft_config is not None:
            raise ValueError("peft_config is not supported: add the adapters with FastLanguageModel.get_peft_model")
        if processing_class is None:
            raise ValueError("GRPOTrainer needs processing_class=tokenizer (to render prompts and read completions)")
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if any(isinstance(f, str) for f in funcs):
            raise ValueError("reward models by name are not supported; give reward functions (callables)")
        if train_dataset is None:
            raise ValueError("GRPOTrainer needs a train_dataset of prompts")
        self.args = args or GRPOConfig()
        self.model, self.processing_class = model, processing_class
        train_args = self.args.train_args(model)
        self.method = GRPO(funcs, self.args.grpo_args(), tokenizer=processing_class)
        train = self.method.tokenize(prompt_examples(train_dataset), processing_class, train_args)
        evaluation = self.method.tokenize(prompt_examples(eval_dataset), processing_class, train_args) \
            if eval_dataset is not None else []
        self.trainer = Trainer(model, train_args, train, evaluation, _Fanout(list(callbacks or ())),
                               pad_id=processing_class.pad_token_id or 0, method=self.method)

    def train(self, resume_from_checkpoint: str | Path | bool | None = None) -> TrainResult:
        """Run to the end (or a callback's stop); `resume_from_checkpoint` True: the latest in output_dir."""
        resume = "latest" if resume_from_checkpoint is True else resume_from_checkpoint or None
        return self.trainer.train(resume_from=resume)

    @property
    def log_history(self) -> list[dict[str, Any]]:
        return self.trainer.state.log_history

    def evaluate(self) -> dict[str, float]:
        return self.trainer.evaluate()

    def save_model(self, output_dir: str | None = None) -> None:
        """The adapter (or the full model) and the tokenizer, as TRL's save_model writes them."""
        directory = output_dir or self.args.output_dir
        self.model.save_pretrained(directory)
        self.processing_class.save_pretrained(directory)


class _Fanout(TrainerCallbacks):
    """Several callbacks as one; the first stop request wins."""

    def __init__(self, callbacks: list[Callbacks]) -> None:
        self.callbacks = callbacks

    def on_log(self, metrics: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_log(metrics)

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_checkpoint(path, step, metrics)

    def on_epoch_end(self, epoch: int) -> None:
        for c in self.callbacks:
            c.on_epoch_end(epoch)

    def on_rollouts(self, step: int, rollouts: list[dict[str, Any]]) -> None:
        for c in self.callbacks:
            if isinstance(c, RolloutCallbacks):
                c.on_rollouts(step, rollouts)

    def should_stop(self) -> StopRequest:
        return next((r for c in self.callbacks if (r := c.should_stop()) is not None), None)
