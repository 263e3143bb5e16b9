"""`SFTTrainer` / `SFTConfig`: TRL's names for what our trainer does, so a notebook's training cell runs as written.

    trainer = SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
                         max_seq_length=2048, packing=False,
                         args=SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=4, max_steps=60,
                                        learning_rate=2e-4, optim="adamw_8bit", output_dir="outputs"))
    trainer_stats = trainer.train()

The dataset (a list of rows or a `datasets.Dataset`) is prepared when the trainer is made, as TRL 1.x prepares a
language-modeling dataset: the text is `formatting_func(example)`, else the `dataset_text_field` column, else a
conversational `messages` column rendered with the chat template; the EOS token is appended to a text that does not
end with it; the text is tokenized and cut to `max_length` tokens (a BOS the tokenizer adds is not doubled when the
text already starts with it, as chat-template text does). `trainer.train_dataset` is then that tokenized dataset,
of the kind it came as, with `input_ids`, `attention_mask`, and `labels` where something like
`train_on_responses_only` set them (loss on every token otherwise). `train()` runs unsloth_core.trainer's loop.

Every argument name is TRL's or transformers'. A name this trainer does not know is a TypeError, and a value it
cannot honour a ValueError saying why: nothing is silently ignored. Two accepted values run differently from
transformers, with the same result: the 8-bit and paged AdamW variants (`optim="adamw_8bit"`) run as AdamW with
32-bit state, the same update at higher precision; and `dataset_num_proc` only sets `datasets.map`'s processes
(the tokenizer is already multi-threaded).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from unsloth_core.data import IGNORE_INDEX, TokenizedExample, pack
from unsloth_core.model import Llama
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_calls import conversation_inputs
from unsloth_core.train_checkpoint import TrainerState
from unsloth_core.trainer import TrainArgs, Trainer, TrainerCallbacks

ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_8bit", "adamw_bnb_8bit", "paged_adamw_8bit",
         "paged_adamw_32bit")
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}


@dataclass(kw_only=True)
class SFTConfig:
    """TRL's `SFTConfig` (transformers' `TrainingArguments` plus SFT's own), for the arguments our trainer has.
    Defaults are TRL's, except `max_length`, which defaults to the model's `max_seq_length`."""

    output_dir: str = "trainer_output"  # checkpoints go to <output_dir>/checkpoints
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 3.0
    max_steps: int = -1  # optimizer steps; > 0 overrides num_train_epochs
    learning_rate: float = 2e-5
    lr_scheduler_type: str = "linear"  # linear, cosine, constant, constant_with_warmup
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # 0 or None: no clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    optim: str = "adamw_torch"
    seed: int = 42
    fp16: bool = False
    bf16: bool | None = None  # None: bf16 where the device has it (as TRL), else fp32
    gradient_checkpointing: bool | None = None  # None: as get_peft_model set it on the model
    logging_steps: int = 10
    save_strategy: str = "steps"  # "steps" or "no"; the run's last step is always checkpointed (to resume from)
    save_steps: int = 500
    save_total_limit: int | None = None
    eval_strategy: str = "no"  # "no" or "steps" (evaluates every eval_steps, and at the end)
    eval_steps: int | None = None
    report_to: str | list[str] | None = "none"  # metrics are returned and kept in trainer.state.log_history
    # SFT's own
    dataset_text_field: str = "text"
    max_length: int | None = None  # tokens per example; None: the model's max_seq_length (1024 if it has none)
    max_seq_length: int | None = None  # TRL < 0.20's name for max_length
    packing: bool = False  # several examples per row, padding-free (data/packing.py)
    eos_token: str | None = None  # appended to texts that do not end with it; None: the tokenizer's EOS
    dataset_num_proc: int | None = None

    def __post_init__(self) -> None:
        if self.max_seq_length is not None:
            if self.max_length is not None and self.max_length != self.max_seq_length:
                raise ValueError(f"max_length={self.max_length} and max_seq_length={self.max_seq_length} "
                                 f"disagree (max_seq_length is the old name of max_length)")
            self.max_length = self.max_seq_length
        reports = [self.report_to] if isinstance(self.report_to, str) or self.report_to is None else self.report_to
        checks = [
            (self.optim in ADAMW, f"optim={self.optim!r} is not supported; the optimizer is AdamW: "
                                  f"{', '.join(ADAMW)}"),
            (self.lr_scheduler_type in SCHEDULERS, f"lr_scheduler_type={self.lr_scheduler_type!r} is not "
                                                   f"supported: {', '.join(SCHEDULERS)}"),
            (not (self.fp16 and self.bf16), "fp16 and bf16 cannot both be set"),
            (self.save_strategy in ("steps", "no"), f"save_strategy={self.save_strategy!r} is not supported: "
                                                    f"'steps' or 'no'"),
            (self.eval_strategy in ("steps", "no"), f"eval_strategy={self.eval_strategy!r} is not supported: "
                                                    f"'steps' or 'no'"),
            (all(r in ("none", None) for r in reports), f"report_to={self.report_to!r} is not supported: metrics "
                                                        f"are in trainer.state.log_history (report_to='none')"),
            (self.max_length is None or self.max_length >= 8, "max_length must be at least 8"),
            (self.warmup_steps >= 0 and 0 <= self.warmup_ratio < 1, "warmup_steps >= 0, 0 <= warmup_ratio < 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def train_args(self, max_length: int, gradient_checkpointing: bool | str) -> TrainArgs:
        """Our trainer's arguments for these."""
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = (
            "float16" if self.fp16 else "bfloat16" if self.bf16 else "float32" if self.bf16 is False else "auto")
        constant = self.lr_scheduler_type == "constant"  # transformers' "constant" has no warmup
        return TrainArgs(
            output_dir=self.output_dir, method="sft", num_epochs=self.num_train_epochs,
            max_steps=self.max_steps if self.max_steps > 0 else None,
            micro_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, learning_rate=self.learning_rate,
            lr_scheduler=SCHEDULERS[self.lr_scheduler_type],  # type: ignore[arg-type]
            warmup_ratio=0.0 if constant else self.warmup_ratio,
            warmup_steps=0 if constant else (self.warmup_steps or None), weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm or None, adam_betas=(self.adam_beta1, self.adam_beta2), seed=self.seed,
            dtype=dtype, gradient_checkpointing=gradient_checkpointing,  # type: ignore[arg-type]
            max_seq_length=max_length, packing=self.packing,
            eval_steps=self.eval_steps if self.eval_strategy == "steps" else None,
            save_steps=self.save_steps if self.save_strategy == "steps" else None,
            save_total_limit=self.save_total_limit, logging_steps=self.logging_steps)


CONFIG_FIELDS = frozenset(f.name for f in fields(SFTConfig))


@dataclass
class TrainOutput:
    """What transformers' `Trainer.train` returns: the steps taken, the mean logged loss, and run metrics."""

    global_step: int
    training_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class SFTTrainer:
    """TRL's `SFTTrainer` over unsloth_core's trainer. SFTConfig's fields may also be given here directly, as older
    TRL (and Unsloth's notebooks) do: `SFTTrainer(..., dataset_text_field="text", max_seq_length=2048)`."""

    def __init__(self, model: Llama, args: SFTConfig | None = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Tokenizer | None = None,
                 formatting_func: Callable[[dict[str, Any]], str] | None = None, *,
                 tokenizer: Tokenizer | None = None, **config: Any) -> None:
        unknown = sorted(set(config) - CONFIG_FIELDS)
        if unknown:
            raise TypeError(f"SFTTrainer got unexpected keyword argument(s) {', '.join(unknown)}")
        args = args or SFTConfig()
        if config:  # the old place for SFT's arguments: they go into a copy of the config
            args = SFTConfig(**{**{f: getattr(args, f) for f in CONFIG_FIELDS}, **config})
        if processing_class is not None and tokenizer is not None and processing_class is not tokenizer:
            raise ValueError("give the tokenizer once, as processing_class (TRL 1.x) or tokenizer (older TRL)")
        processing_class = processing_class or tokenizer
        if not isinstance(processing_class, Tokenizer):
            raise TypeError("SFTTrainer needs the tokenizer from FastLanguageModel.from_pretrained "
                            "(processing_class=tokenizer)")
        if not isinstance(model, Llama):
            raise TypeError("SFTTrainer trains the model from FastLanguageModel.from_pretrained")
        if train_dataset is None:
            raise ValueError("SFTTrainer needs a train_dataset")
        _check_collator(data_collator)
        self.model, self.args, self.data_collator = model, args, data_collator
        self.processing_class = self.tokenizer = processing_class
        self.max_length = args.max_length or getattr(model, "max_seq_length", None) or 1024
        prepare = _Preparer(processing_class, args, self.max_length, formatting_func)
        self.train_dataset = prepare(train_dataset)
        self.eval_dataset = prepare(eval_dataset) if eval_dataset is not None else None
        self.state = TrainerState()

    def train(self, resume_from_checkpoint: bool | str | Path | None = None) -> TrainOutput:
        """Train; `resume_from_checkpoint=True` continues from the newest checkpoint in output_dir, a path from that
        one. Logs are printed (as transformers does) and kept in `trainer.state.log_history`."""
        checkpointing = self.args.gradient_checkpointing
        train_args = self.args.train_args(self.max_length, self.model.gradient_checkpointing if checkpointing is None
                                          else checkpointing)
        train = _examples(self.train_dataset, self.max_length, self.args.packing)
        evaluation = _examples(self.eval_dataset, self.max_length, self.args.packing) if self.eval_dataset else []
        trainer = Trainer(self.model, train_args, train, evaluation, callbacks=_PrintLogs(),
                          pad_id=self.tokenizer.pad_token_id or 0)
        resume = "latest" if resume_from_checkpoint is True else resume_from_checkpoint or None
        start = time.perf_counter()
        result = trainer.train(resume_from=resume)
        runtime = time.perf_counter() - start
        self.state = trainer.state
        losses = [e["loss"] for e in result.metrics if "loss" in e]
        loss = sum(losses) / len(losses) if losses else math.nan
        samples = result.step * train_args.batch_size
        return TrainOutput(result.step, loss, {
            "train_runtime": runtime, "train_samples_per_second": samples / runtime,
            "train_steps_per_second": result.step / runtime, "train_loss": loss,
            "epoch": result.metrics[-1]["epoch"] if result.metrics else 0.0})


class _PrintLogs(TrainerCallbacks):
    def on_log(self, metrics: dict[str, Any]) -> None:
        keys = ("loss", "grad_norm", "learning_rate", "eval_loss", "epoch")
        print({k: round(metrics[k], 6) if isinstance(metrics[k], float) else metrics[k] for k in keys
               if k in metrics})


class _Preparer:
    """Rows (or a datasets.Dataset) to tokenized rows, as TRL prepares a language-modeling dataset."""

    def __init__(self, tokenizer: Tokenizer, args: SFTConfig, max_length: int,
                 formatting_func: Callable[[dict[str, Any]], str] | None) -> None:
        self.tokenizer, self.args, self.max_length, self.formatting_func = tokenizer, args, max_length, formatting_func
        self.eos = args.eos_token or tokenizer.eos_token or ""
        if args.eos_token is not None and tokenizer.token_to_id(args.eos_token) is None:
            raise ValueError(f"eos_token {args.eos_token!r} is not a token of this tokenizer")

    def __call__(self, dataset: Any) -> Any:
        if isinstance(dataset, list):
            if not all(isinstance(row, dict) for row in dataset):
                raise TypeError("a dataset is a list of rows (dicts) or a datasets.Dataset")
            if not dataset:
                raise ValueError("the dataset has no rows")
            if "input_ids" in dataset[0]:
                return dataset  # already tokenized, as TRL takes it
            encoded = self.encode(dataset)
            return [{**row, **dict(zip(encoded, values))} for row, *values in zip(dataset, *encoded.values())]
        if not (hasattr(dataset, "map") and hasattr(dataset, "column_names")):
            raise TypeError(f"a dataset is a list of rows (dicts) or a datasets.Dataset, not {type(dataset).__name__}")
        if "input_ids" in dataset.column_names:
            return dataset

        def encode_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
            return self.encode([dict(zip(batch, values)) for values in zip(*batch.values())])

        return dataset.map(encode_batch, batched=True, num_proc=self.args.dataset_num_proc, desc="Tokenizing")

    def encode(self, rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
        texts, plain = zip(*(self.text(row) for row in rows))
        tok, ids = self.tokenizer, [list[int]() for _ in texts]
        for add_special_tokens in (True, False):  # plain text gets the tokenizer's BOS; a rendered chat has its own
            which = [i for i, p in enumerate(plain) if p == add_special_tokens]
            for i, row in zip(which, tok.encode_batch([texts[i] for i in which], add_special_tokens)):
                ids[i] = row
        bos = tok.bos_token_id
        ids = [r[1:] if bos is not None and r[:2] == [bos, bos] else r for r in ids]  # the text had its own BOS
        ids = [r[:self.max_length] for r in ids]
        return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]}

    def text(self, row: dict[str, Any]) -> tuple[str, bool]:
        """The row's text, and whether it is plain text (the tokenizer's special tokens are added; a rendered
        conversation has them already)."""
        field_name = self.args.dataset_text_field
        if self.formatting_func is not None:
            text = self.formatting_func(row)
            if not isinstance(text, str):
                raise ValueError(f"formatting_func returns one text per example (TRL 1.x), not "
                                 f"{type(text).__name__}: for a batched function, map the dataset first "
                                 f"(dataset.map(func, batched=True)) and pass dataset_text_field")
        elif isinstance(row.get(field_name), str):
            text = row[field_name]
        elif isinstance(row.get("messages"), list):
            # A row's tools and calls as serving renders them (TRL passes `tools` to the template as it is).
            messages, tools = conversation_inputs(self.tokenizer, row["messages"], row.get("tools"))
            return self.tokenizer.apply_chat_template(messages, tools, tokenize=False), False
        else:
            raise ValueError(f"the dataset has no text column {field_name!r} (it has {', '.join(row)}): set "
                             f"dataset_text_field, pass formatting_func, or give a 'messages' column")
        return (text if text.endswith(self.eos) else text + self.eos), True


def _examples(dataset: Any, max_length: int, packing: bool) -> list[Any]:
    """The trainer's examples: ids and labels (the ids themselves where the dataset has no labels)."""
    columns = dataset[0].keys() if isinstance(dataset, list) else dataset.column_names
    if "input_ids" not in columns:
        raise ValueError("the dataset has no input_ids")

    def column(name: str) -> list[Any]:
        return [row[name] for row in dataset] if isinstance(dataset, list) else list(dataset[name])

    all_ids = column("input_ids")
    all_labels = column("labels") if "labels" in columns else all_ids
    examples = []
    for ids, labels in zip(all_ids, all_labels):
        if len(ids) != len(labels):
            raise ValueError("an example's labels and input_ids differ in length")
        examples.append(TokenizedExample(list(ids[:max_length]), list(labels[:max_length])))
    return pack(examples, max_length) if packing else examples


def _check_collator(collator: Any) -> None:
    """Batches are padded on the right with labels IGNORE_INDEX where there is no loss: transformers'
    DataCollatorForSeq2Seq does exactly that (its pad_to_multiple_of changes only the padding), so it is accepted;
    any other collator would do something this trainer does not."""
    if collator is None:
        return
    seq2seq = type(collator).__name__ == "DataCollatorForSeq2Seq"
    if seq2seq and getattr(collator, "label_pad_token_id", None) == IGNORE_INDEX and getattr(
            collator, "padding", True) in (True, "longest"):
        return
    raise ValueError(f"data_collator {type(collator).__name__} is not supported: batches are padded on the right, "
                     f"labels {IGNORE_INDEX} where there is no loss (what DataCollatorForSeq2Seq(tokenizer) does); "
                     f"leave data_collator out, or set labels in the dataset")
