"""One fine-tuning run end to end: load the base, read and tokenize the data, adapt, train, save the result.

This is what `unsloth train` and the Celery worker call; the loop itself lives in trainer.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unsloth_core.checkpoint import TOKENIZER_FILES, atomic_directory, copy_tokenizer_files, load_model, save_model
from unsloth_core.data import epoch_order
from unsloth_core.graded_eval import graded_eval
from unsloth_core.lora import (
    LoRAConfig,
    adapter_state_dict,
    inject,
    load_adapter_weights,
    read_adapter_config,
    write_adapter_files,
)
from unsloth_core.method import Method, method_for
from unsloth_core.model import Llama
from unsloth_core.probes import example_prompts, make_probes
from unsloth_core.rl.rewards import RewardFunc
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_call_check import DEFAULT_MAX_TOKENS, file_tool_turns, tool_call_check
from unsloth_core.trainer import Callbacks, TrainArgs, Trainer, TrainResult, resolve_dtype

FINAL_DIR = "final"


@dataclass
class Datasets:
    train: list[Any]
    eval: list[Any]
    n_examples: int
    n_truncated: int
    n_tokens: int
    held_out: Sequence[Any] = ()  # the held-out examples as read, before tokenizing (their prompts are probes)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_datasets(tokenizer: Tokenizer, args: TrainArgs, train_file: str | Path,
                     validation_file: str | Path | None = None, method: Method | None = None) -> Datasets:
    """Validate (every bad line reported at once, see data.validation), tokenize, split and pack, as the method
    (default: the one args.method names) reads its data."""
    method = method or method_for(args)
    examples = method.load(train_file, tokenizer, args)
    held_out: Sequence[Any] = []
    if validation_file is not None:
        held_out = method.load(validation_file, tokenizer, args, role="validation")
    elif args.validation_split > 0 and len(examples) > 1:
        order = epoch_order(len(examples), args.seed, -1)  # epoch -1: a split independent of training order
        n_eval = max(1, int(len(examples) * args.validation_split))
        held_out = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in order[n_eval:]]
    train, evaluation = method.tokenize(examples, tokenizer, args), method.tokenize(held_out, tokenizer, args)
    n_truncated = sum(x.truncated for x in train)
    n_tokens = sum(method.n_tokens(x) for x in train)
    train, evaluation = method.finalize(train, args), method.finalize(evaluation, args)
    return Datasets(train, evaluation, len(examples), n_truncated, n_tokens, held_out)


def load_base(model_path: str | Path, device: torch.device | None = None, load_in_4bit: bool = False,
              dtype: torch.dtype = torch.float32) -> tuple[Llama, Tokenizer]:
    """A base model for training, in `dtype`; with `load_in_4bit` the block projections are stored in NF4 and only
    dequantized for their products."""
    from unsloth_core.facade import resolve_model_dir

    directory = resolve_model_dir(model_path)
    model = load_model(directory, device or default_device(), dtype=dtype, load_in_4bit=load_in_4bit)
    return model, Tokenizer.from_dir(directory)


def finetune(model_path: str | Path, train_file: str | Path, args: TrainArgs, lora: LoRAConfig | None,
             validation_file: str | Path | None = None, callbacks: Callbacks | None = None,
             resume: str | Path | None = "latest", device: torch.device | None = None,
             method: Method | None = None, init_adapter: str | Path | None = None,
             eval_rewards: Sequence[RewardFunc] = (), eval_samples: int = 32) -> tuple[TrainResult, Path]:
    """Train and write `<output_dir>/final` (a PEFT adapter, or a full model when `lora` is None).

    `lora` None trains every weight. `method` None: the one `args.method` names; GRPO is given as an object, since
    its reward functions are code (`rl.grpo.GRPO(reward_funcs, GRPOArgs(...))`, with `args.method="grpo"`).
    Returns the trainer's result and the final directory, which is written only when training ran to its end
    (after a cancel or pause, the result's checkpoint is where to resume from).

    `eval_rewards` (reward functions, e.g. rl.grader_reward.GraderReward) score greedy answers to the first
    `eval_samples` validation prompts at every evaluation of an SFT or DPO run (GRPO scores its own samples).

    `init_adapter` continues an earlier fine-tune: its adapter (same rank and target modules as `lora`) is the
    starting point, and DPO's and GRPO's reference policy is that fine-tune, not the bare base.
    """
    if lora is None and args.load_in_4bit:
        raise ValueError("load_in_4bit trains LoRA adapters on a frozen 4-bit base; full fine-tuning needs the "
                         "weights in 16 or 32 bits (drop load_in_4bit, or train with LoRA)")
    device = device or default_device()
    # A frozen base loads straight in the compute dtype (in fp32 it would take twice the memory until the trainer
    # casts it); weights that train are fp32 masters, so full fine-tuning loads fp32.
    dtype = resolve_dtype(args.dtype, device) if lora is not None else torch.float32
    model, tokenizer = load_base(model_path, device, args.load_in_4bit, dtype)
    method = method or method_for(args)
    data = prepare_datasets(tokenizer, args, train_file, validation_file, method)
    base_name = str(model_path)
    if lora is not None:
        inject(model, lora, seed=args.seed)
        if init_adapter is not None:
            _continue_from(model, lora, Path(init_adapter))
    elif init_adapter is not None:
        raise ValueError("init_adapter continues a LoRA fine-tune; give the LoRA config it was trained with")
    else:
        model.requires_grad_(True)
    output = Path(args.output_dir)
    tokenizer_dir = output / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer.save_pretrained(tokenizer_dir)
    artifacts = {name: tokenizer_dir / name for name in TOKENIZER_FILES}
    prompts = args.probe_prompts if args.probe_prompts is not None else example_prompts(data.held_out, args.n_probes)
    probes = make_probes(prompts, tokenizer, args.probe_max_tokens,
                         max_prompt_tokens=max(1, args.max_seq_length - args.probe_max_tokens))
    graded = None
    if eval_rewards and validation_file is not None and method.name != "grpo":
        graded = graded_eval(validation_file, eval_rewards, tokenizer, eval_samples,
                             max_prompt_tokens=max(1, args.max_seq_length - 256))
    tool_check = tool_call_check(file_tool_turns([validation_file, train_file], args.tool_call_turns), tokenizer,
                                 max_prompt_tokens=max(1, args.max_seq_length - DEFAULT_MAX_TOKENS))
    trainer = Trainer(model, args, data.train, data.eval, callbacks, pad_id=tokenizer.pad_token_id or 0,
                      artifact_files=artifacts, base_model=base_name, method=method, probes=probes,
                      graded_eval=graded, tool_check=tool_check)
    if tool_check is not None:  # the model as training starts (base, or the fine-tune continued), before any resume
        tool_check.measure_start(model)
    result = trainer.train(resume_from=resume)
    final = output / FINAL_DIR
    if result.status in ("completed", "early_stopped"):
        save_final(model, final, tokenizer_dir, base_name)
    return result, final


def _continue_from(model: Llama, lora: LoRAConfig, adapter: Path) -> None:
    """Start from a saved adapter; it becomes the reference policy too. Its rank and targets must be `lora`'s."""
    saved = read_adapter_config(adapter)
    if saved.r != lora.r or sorted(saved.target_modules) != sorted(lora.target_modules):
        raise ValueError(f"the fine-tune being continued has rank {saved.r} on {', '.join(saved.target_modules)}; "
                         f"train it with the same rank and target modules (got rank {lora.r} on "
                         f"{', '.join(lora.target_modules)})")
    load_adapter_weights(model, adapter)
    model.reference_adapter = {n: p.detach().clone() for n, p in adapter_state_dict(model).items()}


def save_final(model: Llama, directory: Path, tokenizer_dir: Path, base_name: str) -> Path:
    """The run's result: the adapter (PEFT format) or the full model, with the tokenizer and chat template."""
    if model.lora_config is None:
        return save_model(model, directory, tokenizer_dir=tokenizer_dir, dtype=torch.float32)
    with atomic_directory(directory) as tmp:
        write_adapter_files(model, tmp, base_name)
        copy_tokenizer_files(tokenizer_dir, tmp)
    return directory

