"""`python -m bench.profile`: where the time goes, for the rows that miss a target, and whether ours and HF agree.

Three parts, each written to `--out` as it finishes (so a run cut short keeps what it did):
- agree.txt: teacher-forced agreement in the bench's dtype. Both models read the same tokens (a prompt and ours'
  greedy continuation); at each position, does HF's argmax equal ours', and how far apart are the logits against
  their spread. Position-wise equality of two free-running greedy decodes (the decode row's note) falls to a few
  percent after the first near-tie on random weights, which says nothing about a bug; this does.
- decode.txt: one compiled greedy decode of ours under torch.profiler: wall time per token against the GPU time
  per token (host-bound or device-bound), and the ops that take the time.
- decode_ab.txt: the decode loop's designs side by side in one process, wall ms a token at batch 1: the previous
  Generator's own static-batch loop (bench/previous_generator.py) and the one engine's step driven by Generator.
- train.txt: one LoRA training step of each side under torch.profiler, the ops that take the time.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from bench.models import build_hf, build_ours, free_memory
from bench.previous_generator import PreviousGenerator
from bench.workloads import hf_train_step, ours_train_step, prompts
from unsloth_core.generate import Generator
from unsloth_core.model import Llama
from unsloth_core.sampling import SamplingParams

ROWS = 25


def _table(prof: profile, device: torch.device) -> str:
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return str(prof.key_averages().table(sort_by=key, row_limit=ROWS, max_name_column_width=70))


def _device_seconds(prof: profile) -> float:
    """Time the GPU spent in kernels, in seconds: the device-only events (kernels, copies, memsets). A range of ours
    or the compiler's (an autograd Function, a compiled graph's call) carries its kernels' device time too, so
    counting every event counted it twice (an H200 run read 2.75 ms a decode step where the kernels took 1.38)."""
    return sum(e.self_device_time_total for e in prof.key_averages() if e.cpu_time_total == 0) / 1e6


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def agreement(shape: str, device: torch.device, dtype: torch.dtype, bsz: int, seq: int, new: int) -> str:
    ours = build_ours(shape, device, dtype, lora=False).eval()
    x = prompts(ours.config.vocab_size, bsz, seq)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=new, stop_token_ids=[])
    generated = [c.token_ids for c in Generator(ours, None, compile=False).generate(x.tolist(), greedy)]
    tokens = torch.cat([x, torch.tensor(generated)], 1).to(device)
    with torch.no_grad():
        a = ours(tokens).logits
        assert a is not None
        a = a.float()
    del ours
    free_memory(device)
    hf = build_hf(shape, device, dtype, lora=False).eval()
    with torch.no_grad():
        b = hf(input_ids=tokens).logits.float()
    del hf
    free_memory(device)
    span = slice(seq - 1, seq + new - 1)  # the positions whose argmax chose a generated token
    chosen = tokens[:, seq:]
    top2 = b[:, span].topk(2, dim=-1).values
    lines = [
        f"{shape} {dtype} bsz {bsz}, {seq}+{new}, teacher-forced on ours' greedy tokens",
        f"ours' forward argmax = ours' generated token: {(a[:, span].argmax(-1) == chosen).float().mean():.1%}",
        f"HF's argmax = ours' generated token: {(b[:, span].argmax(-1) == chosen).float().mean():.1%}",
        f"HF's argmax = ours' argmax, every position: {(a.argmax(-1) == b.argmax(-1)).float().mean():.1%}",
        f"logits: max |ours - HF| {(a - b).abs().max():.4f}, mean {(a - b).abs().mean():.5f}; "
        f"HF's logit std {b.std():.4f}; HF's top-1 minus top-2 gap: median "
        f"{(top2[..., 0] - top2[..., 1]).median():.4f}",
    ]
    return "\n".join(lines)


def decode_profile(shape: str, device: torch.device, dtype: torch.dtype, bsz: int, seq: int, new: int) -> str:
    model = build_ours(shape, device, dtype, lora=False).eval()
    gen = Generator(model, None, compile=device.type == "cuda", max_seq_length=seq + new)
    rows = prompts(model.config.vocab_size, bsz, seq).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=new, stop_token_ids=[])
    gen.generate(rows, params)  # compile and capture at the timed shapes
    _sync(device)
    t0 = time.perf_counter()
    gen.generate(rows, params)
    _sync(device)
    plain = time.perf_counter() - t0
    with profile(activities=_activities(device)) as prof:
        gen.generate(rows, params)
        _sync(device)
    gpu = _device_seconds(prof)
    head = (f"{shape} {dtype} bsz {bsz}, {seq}+{new}, compiled={gen.compile}: {plain / new * 1e3:.3f} ms a step "
            f"unprofiled; GPU busy {gpu / new * 1e3:.3f} ms a step under the profiler "
            f"({100 * gpu / plain:.0f}% of the unprofiled wall time)")
    del gen, model
    free_memory(device)
    return head + "\n" + _table(prof, device)


def decode_ab(shape: str, device: torch.device, dtype: torch.dtype, bsz: int, seq: int, new: int) -> str:
    model = build_ours(shape, device, dtype, lora=False).eval()
    rows = prompts(model.config.vocab_size, bsz, seq).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=new, stop_token_ids=[])
    compiled = device.type == "cuda"
    # Each design on its own copy of the model: a KV cache (and graphs captured on it) is the model's, and the
    # designs size it differently.
    designs: dict[str, Callable[[Llama], Any]] = {
        "previous Generator (its own loop; captured graphs on a GPU)": lambda m: PreviousGenerator(
            m, None, compile=compiled, max_seq_length=seq + new),
        "one engine (Generator over BatchEngine's step; static step, graphs on a GPU)": lambda m: Generator(
            m, None, compile=compiled, max_seq_length=seq + new),
    }
    gens = {name: make(copy.deepcopy(model)) for name, make in designs.items()}
    lines: list[str] = []
    tokens: dict[str, list[list[int]]] = {}
    cold: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in gens}
    for name, gen in gens.items():
        t0 = time.perf_counter()
        gen.generate(rows, params)  # compile and capture at the timed shapes
        cold[name] = time.perf_counter() - t0
    for _ in range(5):  # the designs in turn, so a noisy neighbour slows both alike
        for name, gen in gens.items():
            _sync(device)
            t0 = time.perf_counter()
            out = gen.generate(rows, params)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            tokens[name] = [c.token_ids for c in out]
    for name in gens:
        best = sorted(times[name])[2] / new * 1e3
        lines.append(f"{name}: {best:.3f} ms a token (median of 5 alternating; {1e3 / best:.0f} tok/s), "
                     f"first call {cold[name]:.1f} s")
    del gens, model
    free_memory(device)
    first = next(iter(tokens.values()))
    n = sum(len(x) for x in first)
    same = [sum(a == b for x, y in zip(first, t) for a, b in zip(x, y)) / n for t in tokens.values()]
    lines.append("same tokens as the first design: " + ", ".join(f"{100 * f:.1f}%" for f in same))
    return f"{shape} {dtype} bsz {bsz}, {seq}+{new}, greedy\n" + "\n".join(lines)


def train_profile(shape: str, device: torch.device, dtype: torch.dtype, bsz: int, seq: int, gc: bool) -> str:
    parts = []
    x = prompts(32000 if shape != "tiny" else 320, bsz, seq).to(device)
    makers: dict[str, Callable[[], Callable[[torch.Tensor], torch.Tensor]]] = {
        "ours": lambda: ours_train_step(shape, device, dtype, gc, {}),
        "hf": lambda: hf_train_step(shape, device, dtype, gc, {}),
    }
    for name, make in makers.items():
        step = make()
        for _ in range(2):
            step(x)
        _sync(device)
        t0 = time.perf_counter()
        step(x)
        _sync(device)
        plain = time.perf_counter() - t0
        with profile(activities=_activities(device)) as prof:
            step(x)
            _sync(device)
        parts.append(f"== {name}: {shape} {dtype} {bsz}x{seq}{' GC' if gc else ''}: {plain * 1e3:.1f} ms a step "
                     f"unprofiled, GPU busy {_device_seconds(prof) * 1e3:.1f} ms\n{_table(prof, device)}")
        del step
        free_memory(device)
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="the tiny shape on the CPU: checks the script")
    ap.add_argument("--only", default="agree,decode,train")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.quick else "cuda")
    shape, dtype = ("tiny", torch.float32) if args.quick else ("llama-1b", torch.bfloat16)
    seq, new, train_bsz, train_seq = (8, 8, 2, 64) if args.quick else (128, 64, 4, 2048)
    parts: dict[str, Callable[[], str]] = {
        "agree": lambda: agreement(shape, device, dtype, 4, seq, new),
        "decode": lambda: decode_profile(shape, device, dtype, 1, seq, new),
        "decode_ab": lambda: decode_ab(shape, device, dtype, 1, seq, 4 * new),
        "train": lambda: train_profile(shape, device, dtype, train_bsz, train_seq, gc=True),
    }
    for name in args.only.split(","):
        t0 = time.perf_counter()
        text = parts[name]()
        (args.out / f"{name}.txt").write_text(text + "\n")
        print(f"== {name} ({time.perf_counter() - t0:.0f} s)\n{text.splitlines()[0]}", flush=True)


if __name__ == "__main__":
    main()
