"""The measurements: LoRA training, loss agreement, longest trainable sequence, greedy decode, the card's ceilings.

Each work is a pair of builders (ours, HF). A builder makes its model, data and warm-up state and returns `run(i)`,
the i-th unit of work (one optimizer step, one generation). `compare` drives the pair: on a GPU one side after the
other (build, measure, free), so each peak memory is its own; on the CPU both at once with their timed runs
alternating, and each side's speed taken from the median of its runs: on a machine shared with other work a run
may be slowed many times over, or catch the cores idle, and the median ignores both. With one torch thread the
runs are timed in process CPU time, which leaves out the turns other processes took on the core; with more, CPU
time would also count threads spinning while a sibling waits for a core, so wall time is used.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from bench.models import (
    LoRAInit,
    PeakMemory,
    build_hf,
    build_ours,
    config,
    decode_weight_bytes,
    free_memory,
    lora_init,
)
from bench.report import Row
from unsloth_core.generate import Generator
from unsloth_core.lora import lora_parameters
from unsloth_core.sampling import SamplingParams

LR = 2e-4
ROOT = Path(__file__).resolve().parent.parent  # errors name the innermost line of ours
Runner = Callable[[int], Any]
Builder = Callable[[], Runner]
Progress = Callable[[dict[str, Any]], None]  # takes a partial result (a probe, a side) the moment it is known


def _ignore(_: dict[str, Any]) -> None:
    pass


@dataclass(frozen=True)
class Job:
    """One row of a plan. For `decode`, `seq` is the prompt length and `new` the tokens generated."""

    work: str  # train | loss | longest | decode | ceilings
    shape: str = ""
    bsz: int = 1
    seq: int = 0
    new: int = 0
    gc: bool = False
    warmup: int = 0
    steps: int = 0
    cap: int = 0  # longest: the longest length probed
    granularity: int = 2048  # longest: lengths probed are multiples of this
    deadline: float = 0.0  # longest: seconds each side's search may take (0: no limit); see search_longest
    long: int = 0  # long-prompt: the length of the prompt that arrives while the streams run
    compiled: bool | None = None  # decode: our step compiled (None: on a GPU only, as Generator defaults)
    nf4: bool = False  # train: our base in 4-bit NF4 (QLoRA), HF's in the compute dtype (no bitsandbytes here)
    generations: int = 0  # grpo: completions per prompt (G); bsz is the prompts a step (bench/grpo.py)

    @property
    def setting(self) -> str:
        if self.work in ("train", "loss"):
            return f"{self.bsz}x{self.seq}{' GC' if self.gc else ''}" + (f", {self.steps} steps"
                                                                        if self.work == "loss" else "") + (
                ", ours NF4 base" if self.nf4 else "")
        if self.work == "decode":
            return f"bsz {self.bsz}, {self.seq}+{self.new}" + (", compiled" if self.compiled else "")
        if self.work == "grpo":
            return (f"{self.bsz} prompt{'s' * (self.bsz != 1)} x G {self.generations}, {self.seq}+{self.new}"
                    + (" GC" if self.gc else ""))
        if self.work == "longest":
            return f"bsz 1, GC, cap {self.cap:,}" + (f", {self.deadline:g} s a side" if self.deadline else "")
        return ""


@dataclass
class Outcome:
    tok_s: float | None = None
    mem_gib: float | None = None
    outputs: list[Any] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # each timed run (CPU) or all of them together (GPU)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time of each timed run (CPU)
    error: str | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def short(e: BaseException) -> str:
    """The error's first line, and where it came from when that is the engine or the bench: the innermost line in
    this repository, named when it is in unsloth_core/ or bench/ (a row keeps no traceback)."""
    text = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(str(ROOT))]
    if not frames or not frames[-1].filename.startswith((str(ROOT / "unsloth_core"), str(ROOT / "bench"))):
        return text
    return f"{text} [at {Path(frames[-1].filename).relative_to(ROOT)}:{frames[-1].lineno}]"


def compare(builders: dict[str, Builder], tokens_per_run: int, warmup: int, reps: int, device: torch.device,
            interleave: bool | None = None) -> dict[str, Outcome]:
    """Time `reps` runs of each side after `warmup` runs; outputs of all runs kept (losses, generated ids).

    `interleave` (default: on the CPU only) keeps both sides alive and alternates their timed runs.
    """
    if not (device.type == "cpu" if interleave is None else interleave):
        return {name: _one_side(build, tokens_per_run, warmup, reps, device) for name, build in builders.items()}
    return _interleaved(builders, tokens_per_run, warmup, reps, device)


def _one_side(build: Builder, tokens_per_run: int, warmup: int, reps: int, device: torch.device) -> Outcome:
    out = Outcome()
    try:
        _measure(build, tokens_per_run, warmup, reps, device, out)
    except Exception as e:  # an OOM costs this side's cell, not the row
        out.error = short(e)
    free_memory(device)  # the model went with _measure's frame (or with the exception, by now)
    return out


def _measure(build: Builder, tokens_per_run: int, warmup: int, reps: int, device: torch.device,
             out: Outcome) -> None:
    with PeakMemory(device) as mem:
        run = build()
        out.outputs += [run(i) for i in range(warmup)]
        sync(device)
        t0 = time.perf_counter()
        out.outputs += [run(i) for i in range(warmup, warmup + reps)]
        sync(device)
        out.seconds = [time.perf_counter() - t0]
        out.tok_s = tokens_per_run * reps / out.seconds[0]
    out.mem_gib = mem.gib


def cpu_time_basis() -> bool:
    return torch.get_num_threads() == 1


def _interleaved(builders: dict[str, Builder], tokens_per_run: int, warmup: int, reps: int,
                 device: torch.device) -> dict[str, Outcome]:
    outs = {name: Outcome() for name in builders}
    runs: dict[str, Runner] = {}
    for name, build in builders.items():  # build and warm up one at a time, so each memory reading is its own
        try:
            with PeakMemory(device) as mem:
                run = build()
                outs[name].outputs += [run(i) for i in range(warmup)]
            outs[name].mem_gib, runs[name] = mem.gib, run
        except Exception as e:
            outs[name].error = short(e)
    for i in range(warmup, warmup + reps):
        for name in list(runs):
            try:
                t0, c0 = time.perf_counter(), time.process_time()
                outs[name].outputs.append(runs[name](i))
                outs[name].seconds.append(time.perf_counter() - t0)
                outs[name].cpu_seconds.append(time.process_time() - c0)
            except Exception as e:
                outs[name].error = short(e)
                del runs[name]
    for name in runs:
        basis = outs[name].cpu_seconds if cpu_time_basis() else outs[name].seconds
        outs[name].tok_s = tokens_per_run / statistics.median(basis) if reps else None
    runs.clear()
    free_memory(device)
    return outs


def _fill(row: Row, outs: dict[str, Outcome], device: torch.device) -> Row:
    row.ours, row.hf = outs["ours"].tok_s, outs["hf"].tok_s
    row.ours_mem_gib, row.hf_mem_gib = outs["ours"].mem_gib, outs["hf"].mem_gib
    row.mem = PeakMemory.kind(device)
    row.errors = {name: o.error for name, o in outs.items() if o.error}
    row.extra["seconds"] = {name: [round(t, 3) for t in o.seconds] for name, o in outs.items()}
    row.timing = ("mean of the timed runs" if device.type == "cuda" else
                  f"median of alternating runs, in {'process CPU' if cpu_time_basis() else 'wall'} time")
    row.extra["cpu_seconds"] = {name: [round(t, 3) for t in o.cpu_seconds] for name, o in outs.items()}
    return row


# ---- LoRA training ----


def batches(vocab: int, bsz: int, seq: int, device: torch.device) -> list[Tensor]:
    """hf_baseline.py's data: four batches of random tokens from seed 0, cycled; labels are the inputs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return [torch.randint(0, vocab, (bsz, seq), generator=g).to(device) for _ in range(4)]


def autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


StepFn = Callable[[Tensor], Tensor]  # one optimizer step on a batch of token ids; returns the loss


def ours_train_step(shape: str, device: torch.device, dtype: torch.dtype, checkpointing: bool | str,
                    shared: dict[str, LoRAInit], nf4: bool = False) -> StepFn:
    model = build_ours(shape, device, dtype, lora=True, nf4=nf4).train()
    model.gradient_checkpointing = checkpointing
    shared["lora"] = lora_init(model)  # HF's PEFT adapters start from the same A and B
    opt = torch.optim.AdamW(lora_parameters(model), lr=LR)

    def step(x: Tensor) -> Tensor:
        with autocast(device, dtype):
            out = model(x, labels=x, return_logits=False)  # the chunked fused loss: no full logits
        assert out.loss is not None
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def hf_train_step(shape: str, device: torch.device, dtype: torch.dtype, gc: bool,
                  shared: dict[str, LoRAInit]) -> StepFn:
    model = build_hf(shape, device, dtype, lora=True, gc=gc, init=shared.get("lora")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(x: Tensor) -> Tensor:
        with autocast(device, dtype):
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return step


def train_builders(job: Job, device: torch.device, dtype: torch.dtype) -> dict[str, Builder]:
    shared: dict[str, LoRAInit] = {}
    makers: dict[str, Callable[[], StepFn]] = {
        "ours": lambda: ours_train_step(job.shape, device, dtype, job.gc, shared, job.nf4),
        "hf": lambda: hf_train_step(job.shape, device, dtype, job.gc, shared),
    }

    def on_batches(make: Callable[[], StepFn]) -> Builder:
        def build() -> Runner:
            step = make()
            data = batches(config(job.shape).vocab_size, job.bsz, job.seq, device)
            return lambda i: step(data[i % len(data)])

        return build

    return {name: on_batches(make) for name, make in makers.items()}


def max_rel_diff(ours: list[float], hf: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(ours, hf, strict=True))


def train(job: Job, device: torch.device, dtype: torch.dtype) -> Row:
    outs = compare(train_builders(job, device, dtype), job.bsz * job.seq, job.warmup, job.steps, device)
    row = _fill(Row("QLoRA train" if job.nf4 else "LoRA train", job.shape, job.setting, "tok/s"), outs, device)
    if job.nf4:
        row.note = "ours: NF4 base (4.5 bits a weight); HF + PEFT: the base in the compute dtype"
    curves = {name: [float(x) for x in o.outputs] for name, o in outs.items()}
    row.extra.update(losses=curves, warmup=job.warmup, steps=job.steps)
    if not row.errors:
        row.extra["max_rel_loss_diff"] = max_rel_diff(curves["ours"], curves["hf"])
    return row


def loss_agreement(job: Job, device: torch.device, dtype: torch.dtype, tolerance: float = 0.01) -> Row:
    """The loss curves of ours and HF + PEFT over the first `steps` steps: same data, weights, LoRA init, seed."""
    outs = compare(train_builders(job, device, dtype), job.bsz * job.seq, 0, job.steps, device)
    row = _fill(Row("loss agreement", job.shape, job.setting, "loss"), outs, device)
    curves = {name: [float(x) for x in o.outputs] for name, o in outs.items()}
    row.ours = curves["ours"][-1] if curves["ours"] else None
    row.hf = curves["hf"][-1] if curves["hf"] else None
    row.ours_mem_gib = row.hf_mem_gib = None  # this row is about numerics; training memory has its own rows
    row.mem = row.timing = ""
    row.extra = {"losses": curves, "tolerance": tolerance}
    if not row.errors:
        diff = max_rel_diff(curves["ours"], curves["hf"])
        row.extra.update(max_rel_diff=diff, within_tolerance=diff <= tolerance)
        row.note = f"loss at last step; max rel diff {diff:.1e} over {job.steps} steps (target <= {tolerance:.0%})"
    return row


# ---- longest trainable sequence ----


# Allocation failures that do not come as torch's OutOfMemoryError: a library's workspace or handle that could not
# be allocated on a full card is the same answer.
OOM_MARKERS = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or any(m in str(e).lower() for m in OOM_MARKERS)


def host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Bracket(NamedTuple):
    """What a search found: the longest length that fitted (0: none did) and the shortest found not to (None: none
    failed). `stopped` says why the search ended before narrowing the two to one step ("deadline", "error"; None
    when it finished); `error` is the probe's error that ended it."""

    longest: int
    fails_at: int | None
    stopped: str | None = None
    error: str | None = None


def _next_length(good: int, bad: int | None, start: int, step: int, cap: int) -> int | None:
    """The next length to probe (doubling from `start` up to `cap`, then bisection), None when done."""
    if bad is None:
        return None if good >= cap else min(2 * good if good else start, cap)
    mid = (good + bad) // 2 // step * step
    return mid if bad - good > step and mid > good else None


def _predicted(n: int, probes: list[tuple[int, float, bool]]) -> float:
    """Seconds a probe of length `n` should take, scaled from the longest probe that fitted (else the longest one;
    the first probe pays one-time costs such as kernel builds, so a later one is the better base). A step's
    attention work grows with the square of the length and the rest linearly: the square above the base and a
    straight line below it err on the long side."""
    if not probes:
        return 0.0
    base, seconds, _ = max(probes, key=lambda p: (p[2], p[0]))
    return seconds * (n / base) ** (2 if n > base else 1)


def search_longest(fits: Callable[[int], bool], start: int, step: int, cap: int, deadline: float | None = None,
                   clock: Callable[[], float] = time.monotonic) -> Bracket:
    """The longest length that fits and the shortest found not to, lengths multiples of `step`: doubling from
    `start`, then bisection. `fails_at` is None when `cap` fitted (the true limit is higher).

    With a `deadline` (seconds from the start) no probe starts that is predicted to end past it, and a probe that
    raises ends the search too: either way the bracket found so far comes back, with `stopped` set, rather than
    nothing from a run its caller's time limit kills.
    """
    t0 = clock()
    good, bad = 0, None
    probes: list[tuple[int, float, bool]] = []  # (length, seconds, fitted)
    while (n := _next_length(good, bad, start, step, cap)) is not None:
        if deadline is not None and clock() - t0 + _predicted(n, probes) > deadline:
            return Bracket(good, bad, "deadline")
        t = clock()
        try:
            ok = fits(n)
        except Exception as e:  # a probe that cannot tell ends the search; what it found so far stands
            return Bracket(good, bad, "error", short(e))
        probes.append((n, clock() - t, ok))
        good, bad = (n, bad) if ok else (good, n)
    return Bracket(good, bad)


def longest_side(job: Job, device: torch.device, dtype: torch.dtype, ours: bool,
                 progress: Progress = _ignore) -> dict[str, Any]:
    """Search the longest batch-1 LoRA step (forward, backward, AdamW) that fits; ours offloads layer inputs.

    Each probe goes to `progress` as it starts and as it ends, so a run killed in the middle still shows how far
    it got. An error other than running out of memory is recorded and ends the search, keeping what it found.
    """
    side = "ours" if ours else "hf"
    cfg = config(job.shape)
    shared: dict[str, LoRAInit] = {}
    step: StepFn | None = (ours_train_step(job.shape, device, dtype, "offload", shared) if ours
                           else hf_train_step(job.shape, device, dtype, True, shared))
    probes: list[dict[str, Any]] = []
    # Offloaded layer inputs live in pinned host memory: refuse lengths that would exhaust it (and kill us).
    host_budget = int(0.8 * host_available_bytes())

    def record(probe: dict[str, Any]) -> None:
        probes.append(probe)
        progress({"event": "probe", "side": side, **probe})

    def fits(n: int) -> bool:
        assert step is not None
        host = cfg.num_hidden_layers * n * cfg.hidden_size * dtype.itemsize
        if ours and host > host_budget:
            record({"seq": n, "ok": False, "why": f"host memory ({host / 2**30:.0f} GiB of layer inputs)"})
            return False
        progress({"event": "probing", "side": side, "seq": n})
        x = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        t0 = time.perf_counter()
        why, failure = "", None
        with PeakMemory(device) as mem:
            try:
                step(x)
                sync(device)
            except Exception as e:  # OOM is the answer looked for; anything else ends the search, once recorded
                why = "OOM" if is_oom(e) else short(e)
                # Without its traceback the error holds no frame, so the probe's activations can be freed.
                failure = None if is_oom(e) else e.with_traceback(None)
        record({"seq": n, "ok": not why, "why": why, "s": round(time.perf_counter() - t0, 1),
                "peak_gib": None if mem.gib is None else round(mem.gib, 2)})
        del x
        if failure is not None:  # raised before freeing: after a CUDA error freeing fails too, and would hide it
            raise failure
        free_memory(device)
        return not why

    try:
        found = search_longest(fits, job.seq, job.granularity, job.cap // job.granularity * job.granularity,
                               job.deadline or None)
    finally:
        step = None
        free_memory(device)
    error = found.error
    if found.stopped == "error" and probes and probes[-1]["why"]:
        error = probes[-1]["why"]  # the probe's own text names where it failed; the re-raise names the probe
    return {"longest": found.longest, "fails_at": found.fails_at, "stopped": found.stopped, "error": error,
            "probes": probes}


def _bracket_note(f: dict[str, Any]) -> str:
    fail = f["fails_at"]
    why = next((p["why"] for p in f["probes"] if p["seq"] == fail), "") if fail else ""
    if not f["stopped"]:
        return f"{why} at {fail:,}" if fail else "the cap fits (the limit is higher)"
    found = f"between {f['longest']:,} and {fail:,} ({why})" if fail else f"at least {f['longest']:,}"
    return f"{found}, search stopped by {'the deadline' if f['stopped'] == 'deadline' else 'an error'}"


def longest(job: Job, device: torch.device, dtype: torch.dtype, progress: Progress = _ignore) -> Row:
    """Both sides' searches; each side's result goes to `progress` as soon as that side is done."""
    row = Row("longest seq", job.shape, job.setting, "tokens", mem=PeakMemory.kind(device).split(" (")[0])
    found: dict[str, dict[str, Any]] = {}
    for name in ("ours", "hf"):
        try:
            found[name] = longest_side(job, device, dtype, ours=name == "ours", progress=progress)
        except Exception as e:  # building the side failed (no probe ran), or freeing it after a CUDA error
            row.errors[name] = short(e)
        else:
            progress({"event": "side", "side": name, **{k: v for k, v in found[name].items() if k != "probes"}})
        free_memory(device)
    row.extra = {"ours_checkpointing": "offload", "hf_checkpointing": "non-reentrant", **found}
    notes = []
    for name, f in found.items():
        best = [p for p in f["probes"] if p["ok"] and p["seq"] == f["longest"]]
        peak = best[0]["peak_gib"] if best else None  # peak memory of the longest step that fitted
        if name == "ours":
            row.ours, row.ours_mem_gib = f["longest"], peak
        else:
            row.hf, row.hf_mem_gib = f["longest"], peak
        if f["error"]:
            row.errors[name] = f["error"]
        notes.append(f"{name}: {_bracket_note(f)}")
    row.note = "; ".join(notes)
    return row


# ---- greedy decode ----


def prompts(vocab: int, bsz: int, length: int) -> Tensor:
    """hf_baseline.py's prompts: random tokens from seed 1."""
    return torch.randint(0, vocab, (bsz, length), generator=torch.Generator(device="cpu").manual_seed(1))


def compiled_on(job: Job, device: torch.device) -> bool:
    """Whether our decode step is compiled: as the job asks, else on a GPU only (CUDA graphs), Generator's default."""
    return device.type == "cuda" if job.compiled is None else job.compiled


def decode_setting(job: Job, device: torch.device) -> str:
    """The row's setting, saying when ours ran compiled, the GPU's default too (HF's `generate` runs eagerly)."""
    compiled = compiled_on(job, device)
    cuda_graphs = " (CUDA graphs)" if compiled and device.type == "cuda" else ""
    return dataclasses.replace(job, compiled=compiled).setting + cuda_graphs


def ours_decoder(job: Job, device: torch.device, dtype: torch.dtype, info: dict[str, Any]) -> Builder:
    def build() -> Runner:
        model = build_ours(job.shape, device, dtype, lora=False).eval()
        info["weight_bytes"] = decode_weight_bytes(model)
        gen = Generator(model, None, max_seq_length=job.seq + job.new, compile=compiled_on(job, device))
        rows = prompts(model.config.vocab_size, job.bsz, job.seq).tolist()

        def generate(n: int) -> list[list[int]]:
            params = SamplingParams(temperature=0.0, max_new_tokens=n, stop_token_ids=[])
            return [c.token_ids for c in gen.generate(rows, params)]

        # Warm-up, not timed. Compiled (on a GPU), it runs the timed run's exact shapes, so the capture of the decode
        # step (and the KV cache size, which may grow with the number of new tokens) is done before timing.
        generate(job.new if gen.compile else min(job.new, 16))
        return lambda _: generate(job.new)

    return build


def hf_decoder(job: Job, device: torch.device, dtype: torch.dtype) -> Builder:
    def build() -> Runner:
        model = build_hf(job.shape, device, dtype, lora=False).eval()
        x = prompts(model.config.vocab_size, job.bsz, job.seq).to(device)

        @torch.no_grad()
        def generate(n: int) -> list[list[int]]:
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, min_new_tokens=n,
                                 max_new_tokens=n, pad_token_id=0)
            return out[:, job.seq:].tolist()

        generate(min(job.new, 16))
        return lambda _: generate(job.new)

    return build


def decode(job: Job, device: torch.device, dtype: torch.dtype, copy_tb_s: float | None, reps: int = 1) -> Row:
    info: dict[str, Any] = {}
    builders = {"ours": ours_decoder(job, device, dtype, info), "hf": hf_decoder(job, device, dtype)}
    outs = compare(builders, job.bsz * job.new, 0, reps, device)
    row = _fill(Row("greedy decode", job.shape, decode_setting(job, device), "tok/s"), outs, device)
    notes = []
    if not row.errors:
        ours_ids, hf_ids = outs["ours"].outputs[-1], outs["hf"].outputs[-1]
        same = sum(a == b for x, y in zip(ours_ids, hf_ids) for a, b in zip(x, y)) / (job.bsz * job.new)
        row.extra["same_tokens_as_hf"] = same
        notes.append(f"{same:.0%} of tokens as HF's")
    if copy_tb_s and row.ours and "weight_bytes" in info:
        limit = job.bsz * copy_tb_s * 1e12 / info["weight_bytes"]  # every step reads every weight once
        row.extra.update(weight_bytes=info["weight_bytes"], bandwidth_limit_tok_s=limit,
                         pct_of_bandwidth_limit=100 * row.ours / limit)
        notes.append(f"ours {100 * row.ours / limit:.0f}% of the bandwidth limit ({limit:,.0f} tok/s)")
    row.note = "; ".join(notes)
    return row


# ---- the card ----


def ceilings(device: torch.device) -> Row:
    """bf16 matmul TFLOP/s and device copy TB/s, measured as hf_baseline.py does."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    tflops = 10 * 2 * 8192**3 / (time.perf_counter() - t0) / 1e12
    del a, b
    x = torch.empty(2**30, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    tb_s = 10 * 2 * 2**30 / (time.perf_counter() - t0) / 1e12
    del x, y
    free_memory(device)
    return Row("ceilings", torch.cuda.get_device_name(device), "", "",
               note=f"bf16 matmul {tflops:.0f} TFLOP/s, device copy {tb_s:.2f} TB/s",
               extra={"bf16_matmul_tflops": round(tflops, 1), "copy_tb_s": round(tb_s, 3)})
