"""GRPO steps a minute and peak memory: ours (`unsloth_core.rl.GRPOTrainer`) against TRL's `GRPOTrainer` (issue 16).

Both sides train the same random-weight Llama (bench/models.py: ours as `unsloth_core.model.Llama` + our LoRA,
TRL's as transformers' `LlamaForCausalLM` + PEFT LoRA with ours' A and B copied in) on the same prompts, with the
same reward function, G completions per prompt, LoRA config, optimizer settings and dtype. A step is one optimizer
step: sample G completions for each of `bsz` prompts, score them, one forward and backward over the `bsz x G`
completions in one micro-batch, AdamW. beta 0 (no reference forward), num_iterations 1, loss_type "dapo",
temperature 1, no top-k / top-p; gradient checkpointing as the job says, on both sides.

Every completion is exactly `new` tokens on both sides, so the work is the same: TRL's generation gets
`min_new_tokens = new` (its `generation_kwargs`), and ours has no stop token at all (the model's config carries no
EOS id and our tokenizer names none; our GRPOConfig has no min_new_tokens). The mean completion lengths each side
logged are kept in the row (`extra.mean_completion_length`) to show it.

The tokenizer is one token per byte, padded with word tokens (" w123") up to the shape's vocabulary, so that every
id a random model samples decodes to text the reward can read; prompts are `seq` lowercase letters and spaces,
`seq` tokens each, all of one length (no padding on either side).

Each side runs in a process of its own (`python -m bench.grpo --side ours|trl`), one after the other, so each peak
RSS is its own and neither pays for the other's imports. Memory is the rise of the process's peak RSS (VmHWM, reset
after the imports) from before the model is built to the end of the last step; on a GPU,
`torch.cuda.max_memory_allocated`. The absolute peak RSS (imports included: TRL brings datasets, pandas, pyarrow)
goes to `extra`. The first `warmup` steps are not timed; speed is 60 / the median of the timed steps' seconds,
each step measured from the end of the one before (generation, reward, training, logging: everything), in process
CPU time with one torch thread and wall time with more (as the other CPU rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.models import LORA_ALPHA, LORA_R, _status_kib, build_hf, build_ours, config, free_memory, lora_init
from bench.report import Row
from bench.workloads import Job

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("ours", "trl")
LR = 1e-5
SEED = 42
PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
LETTERS = "abcdefghijklmnopqrstuvwxyz "


@dataclass(frozen=True)
class Spec:
    """What one side runs; passed to its process as JSON."""

    shape: str
    prompts: int  # per step
    generations: int  # G
    prompt_len: int  # tokens
    completion_len: int  # tokens, every completion
    warmup: int
    steps: int  # timed
    gc: bool
    threads: int
    device: str
    lora_init: str  # torch.save'd LoRAInit (ours' A and B) for TRL's PEFT adapters


def setting(spec: Spec) -> str:
    return (f"{spec.prompts} prompt{'s' * (spec.prompts != 1)} x G {spec.generations}, "
            f"{spec.prompt_len}+{spec.completion_len}"
            + (" GC" if spec.gc else ""))


# ---- what both sides share ----


def backend(vocab_size: int) -> Any:
    """A byte-level BPE with no merges (one token per byte), word tokens up to `vocab_size`, then the specials."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for i in range(len(alphabet), vocab_size - 3):
        vocab[f"Ġw{i}"] = i  # "Ġ" is the byte-level space: decodes to " w<i>"
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([PAD, BOS, EOS])
    return tok


def prompt_texts(n: int, length: int, seed: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(LETTERS), (n, length), generator=g)
    return ["".join(LETTERS[int(i)] for i in row) for row in idx]


def reward_lowercase(prompts: list[Any], completions: list[Any], **_: Any) -> list[float | None]:  # noqa: ARG001
    """The share of lowercase letters in each completion: cheap, and the same on both sides."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum("a" <= ch <= "z" for ch in t) / max(len(t), 1) for t in texts]


def dataset(spec: Spec) -> list[dict[str, str]]:
    return [{"prompt": p} for p in prompt_texts(spec.prompts * (spec.warmup + spec.steps), spec.prompt_len)]


class StepClock:
    """Each step's end (wall and process CPU time), its logged metrics, and the peak memory by then."""

    def __init__(self, device: torch.device, base_kib: int | None) -> None:
        self.device, self.base_kib = device, base_kib
        self.start = (time.perf_counter(), time.process_time())
        self.ends: list[tuple[float, float]] = []
        self.peak_gib: float | None = None
        self.logs: list[dict[str, float]] = []
        self.generation: list[tuple[float, float]] = []  # (wall, CPU) seconds of each step's sampling

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` (a side's sampling call), its wall and CPU seconds recorded."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.generation.append((time.perf_counter() - t0, time.process_time() - c0))

        return wrapper

    def step_end(self) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))
        self.peak_gib = peak_gib(self.device, self.base_kib)

    def log(self, metrics: dict[str, Any]) -> None:
        keep = ("completions/mean_length", "reward", "loss")
        if "completions/mean_length" in metrics:
            self.logs.append({k: float(metrics[k]) for k in keep if k in metrics})

    def result(self, warmup: int) -> dict[str, Any]:
        marks = [self.start, *self.ends]
        wall = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
        cpu = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
        return {"wall_s": wall, "cpu_s": cpu, "warmup": warmup, "mem_gib": self.peak_gib,
                "generation_wall_s": [g[0] for g in self.generation],
                "generation_cpu_s": [g[1] for g in self.generation],
                "mean_completion_length": [m.get("completions/mean_length") for m in self.logs],
                "reward": [m.get("reward") for m in self.logs], "loss": [m.get("loss") for m in self.logs]}


def prewarm() -> None:
    """One AdamW step on a scalar: its first use imports torch._dynamo (sympy, ...), about 140 MiB of RSS that the
    side which happened to import it first would otherwise not be charged and the other would."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(2)
    opt.step()


def reset_peak(device: torch.device) -> int | None:
    """Reset the peak-memory counter; on the CPU return the RSS now (KiB), the base the rise is counted from."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return _status_kib("VmRSS")
    except OSError:
        return None


def peak_gib(device: torch.device, base_kib: int | None) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return None if base_kib is None else (_status_kib("VmHWM") - base_kib) / 2**20


# ---- the two sides, each in its own process ----


def run_ours(spec: Spec, out_dir: Path) -> dict[str, Any]:
    from unsloth_core.rl import GRPOConfig, GRPOTrainer
    from unsloth_core.tokenizer import Tokenizer
    from unsloth_core.trainer import TrainerCallbacks

    device = torch.device(spec.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = Tokenizer(backend(config(spec.shape).vocab_size), {"bos_token": BOS, "pad_token": PAD})
    data = dataset(spec)
    prewarm()
    base = reset_peak(device)
    clock = StepClock(device, base)

    class Clock(TrainerCallbacks):
        def on_log(self, metrics: dict[str, Any]) -> None:
            if "completions/mean_length" in metrics:  # a training step's log (logging_steps=1)
                clock.step_end()
                clock.log(metrics)

    model = build_ours(spec.shape, device, dtype, lora=True)  # the LoRA of bench/models.py, A from seed 0
    model.config.eos_token_id = None  # no stop token: every completion runs to max_completion_length
    args = GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=spec.prompts * spec.generations,
                      gradient_accumulation_steps=1, num_generations=spec.generations,
                      max_prompt_length=spec.prompt_len, max_completion_length=spec.completion_len,
                      max_steps=spec.warmup + spec.steps, learning_rate=LR, logging_steps=1, save_strategy="no",
                      bf16=dtype == torch.bfloat16, gradient_checkpointing=spec.gc, beta=0.0, loss_type="dapo",
                      temperature=1.0, top_p=1.0, top_k=0, seed=SEED, log_rollouts=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_lowercase, args=args, processing_class=tokenizer,
                          train_dataset=data, callbacks=[Clock()])
    trainer.method._sample = clock.timed(trainer.method._sample)
    clock.start = (time.perf_counter(), time.process_time())
    trainer.train()
    return clock.result(spec.warmup)


def run_trl(spec: Spec, out_dir: Path) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    device = torch.device(spec.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend(config(spec.shape).vocab_size), bos_token=BOS,
                                        eos_token=EOS, pad_token=PAD, padding_side="left")
    data = Dataset.from_list(dataset(spec))
    init = torch.load(spec.lora_init) if spec.lora_init else None
    prewarm()
    base = reset_peak(device)
    clock = StepClock(device, base)

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.step_end()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
            clock.log(logs or {})

    model = build_hf(spec.shape, device, dtype, lora=True, init=init)  # PEFT LoRA r16/alpha16, ours' A and B
    args = trl.GRPOConfig(output_dir=str(out_dir), per_device_train_batch_size=spec.prompts * spec.generations,
                          gradient_accumulation_steps=1, num_generations=spec.generations,
                          max_completion_length=spec.completion_len, max_steps=spec.warmup + spec.steps,
                          learning_rate=LR, logging_steps=1, save_strategy="no", report_to=[],
                          use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16, fp16=False,
                          gradient_checkpointing=spec.gc, beta=0.0, loss_type="dapo", temperature=1.0, top_p=1.0,
                          top_k=0, seed=SEED, disable_tqdm=True, dataloader_num_workers=0,
                          generation_kwargs={"min_new_tokens": spec.completion_len})
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward_lowercase, args=args, processing_class=tokenizer,
                              train_dataset=data, callbacks=[Clock()])
    trainer._generate_single_turn = clock.timed(trainer._generate_single_turn)  # type: ignore[method-assign]
    clock.start = (time.perf_counter(), time.process_time())
    trainer.train()
    return clock.result(spec.warmup)


def side_main(argv: list[str] | None = None) -> int:
    """`python -m bench.grpo --side ours|trl --spec JSON --out PATH`: one side's run, its result as JSON in PATH."""
    ap = argparse.ArgumentParser(prog="python -m bench.grpo")
    ap.add_argument("--side", choices=SIDES, required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    spec = Spec(**json.loads(a.spec))
    from bench.run import quiet

    torch.manual_seed(0)
    with quiet(spec.threads), tempfile.TemporaryDirectory() as d:
        result = (run_ours if a.side == "ours" else run_trl)(spec, Path(d))
    if spec.device == "cpu":
        result["peak_rss_gib"] = _status_kib("VmHWM") / 2**20  # the whole process's, imports included
    Path(a.out).write_text(json.dumps(result))
    return 0


# ---- the row ----


def spawn(side: str, spec: Spec, directory: Path, timeout: float = 3600) -> dict[str, Any]:
    out = directory / f"{side}.json"
    cmd = [sys.executable, "-m", "bench.grpo", "--side", side, "--spec", json.dumps(dataclasses.asdict(spec)),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0 or not out.exists():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"{side} side exited {proc.returncode}: {lines[-1] if lines else 'no output'}"[:300])
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def steps_per_min(result: dict[str, Any], cpu_basis: bool) -> float | None:
    """60 / the median timed step (per minute: a CPU step of the SmolLM2 shape takes tens of seconds)."""
    timed = (result["cpu_s"] if cpu_basis else result["wall_s"])[result["warmup"]:]
    return 60 / statistics.median(timed) if timed else None


def grpo_row(job: Job, device: torch.device, dtype: torch.dtype) -> Row:  # noqa: ARG001 (each side picks its dtype)
    """`job` (bench.workloads.Job): shape, bsz (prompts a step), generations (G), seq (prompt tokens), new
    (completion tokens), warmup and timed steps, gc."""
    threads = torch.get_num_threads()
    spec = Spec(job.shape, job.bsz, job.generations, job.seq, job.new, job.warmup, job.steps, job.gc, threads,
                device.type, "")
    row = Row("GRPO", job.shape, setting(spec), "steps/min",
              mem="peak RSS rise, own process (build + train)" if device.type == "cpu" else
              "cuda max_memory_allocated, own process",
              timing=f"median of timed steps, each side in its own process, in "
                     f"{'process CPU' if threads == 1 else 'wall'} time")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as d:
        model = build_ours(job.shape, torch.device("cpu"), torch.float32, lora=True)
        torch.save(lora_init(model), Path(d) / "lora.pt")  # TRL's PEFT adapters start from ours' A and B
        del model
        free_memory(torch.device("cpu"))
        spec = dataclasses.replace(spec, lora_init=str(Path(d) / "lora.pt"))
        for side in SIDES:
            try:
                results[side] = spawn(side, spec, Path(d))
            except Exception as e:  # one side's failure costs its cell, not the row
                row.errors["ours" if side == "ours" else "hf"] = f"{type(e).__name__}: {e}"[:300]
    ours, trl = results.get("ours"), results.get("trl")
    if ours:
        row.ours, row.ours_mem_gib = steps_per_min(ours, threads == 1), ours["mem_gib"]
    if trl:
        row.hf, row.hf_mem_gib = steps_per_min(trl, threads == 1), trl["mem_gib"]
    import importlib.metadata

    row.extra = {"peer": f"TRL {importlib.metadata.version('trl')} GRPOTrainer (transformers + PEFT)",
                 "lora": {"r": LORA_R, "alpha": LORA_ALPHA}, "spec": dataclasses.asdict(spec) | {"lora_init": ""},
                 **{k: {side: r.get(k) for side, r in results.items()}
                    for k in ("wall_s", "cpu_s", "generation_wall_s", "generation_cpu_s", "mean_completion_length",
                              "reward", "loss", "peak_rss_gib")}}
    lengths = {side: r["mean_completion_length"] for side, r in results.items()}
    notes = ["peer: TRL GRPOTrainer"]
    if lengths:
        flat = {side: sorted({x for x in v if x is not None}) for side, v in lengths.items()}
        notes.append("mean completion length " + ", ".join(f"{side} {'/'.join(f'{x:g}' for x in v) or '-'}"
                                                            for side, v in flat.items()))
    if ours and trl and ours.get("peak_rss_gib") and trl.get("peak_rss_gib"):
        notes.append(f"whole-process peak RSS {ours['peak_rss_gib']:.2f} / {trl['peak_rss_gib']:.2f} GiB")
    row.note = "; ".join(notes)
    return row


if __name__ == "__main__":
    raise SystemExit(side_main())
