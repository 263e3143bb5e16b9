"""Serving rows: many streams in one engine, and many adapters in one batch, against the designs they replace.

- `adapters`: B streams at once, each on its own rank-16 adapter (all seven projections), in one engine with an
  `AdapterPool`. Two rows: against B streams on the bare base in the same engine (target >= 0.75x), and against the
  previous design, one engine per adapter, each with its own model sharing the base's weights (target >= 4x on
  the CPU).
- `streams`: B streams on the base in one engine against one stream alone (aggregate tok/s; target >= 4x on the
  CPU, >= 15x on a GPU), with the time to first token (p50 / p99) of the B streams.
- `served-step`: B streams in one engine on the base, its compiled static step (unsloth_core/static_step.py: CUDA
  graphs on a GPU, inductor's C++ on the CPU) against its eager step, the previous design (aggregate tok/s). On the
  CPU the engine keeps whichever this row shows faster.
- `adapter-load`: the p99 inter-token latency of B running streams while adapters load into their engine's pool,
  against their steady p99 before (target: at most 2x).
- `long-prompt`: the longest inter-token gap of B running streams while a long prompt is prefilled, in chunks
  between their decode steps against in one forward (the previous design).

Greedy, no EOS, every stream `new` tokens after a `seq`-token prompt; each side warmed up once at its shapes first.
The adapters are random (A ~ N(0, 1/in), B ~ N(0, 0.02)), written in PEFT's format and loaded as the server loads
them.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.models import build_ours, free_memory
from bench.report import Row
from bench.workloads import Job, prompts
from unsloth_core.adapters import AdapterPool
from unsloth_core.config import PROJECTIONS
from unsloth_core.generate import Delta
from unsloth_core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoRAConfig, load_adapter, peft_key
from unsloth_core.model import Llama
from unsloth_core.sampling import SamplingParams
from unsloth_core.serving import PREFILL_CHUNK, BatchEngine, Stream

RANK = 16


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def random_adapter(model: Llama, directory: Path, seed: int, r: int = RANK) -> Path:
    """A rank-`r` adapter on all seven projections of `model`, in PEFT's files."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            tensors[peft_key(f"{name}.lora_A.weight")] = torch.randn(r, module.in_features, generator=g) \
                / module.in_features**0.5
            tensors[peft_key(f"{name}.lora_B.weight")] = torch.randn(module.out_features, r, generator=g) * 0.02
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(LoRAConfig(r=r, lora_alpha=r).to_peft()))
    return directory


class _Clock:
    """Times B requests: when each first token came, when the last request ended."""

    def __init__(self, n: int) -> None:
        self.start = time.perf_counter()
        self.first: list[float | None] = [None] * n
        self.open = n
        self.tokens = 0
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def stream(self, i: int) -> Stream:
        def on_item(item: Delta | BaseException | None) -> None:  # on an engine's thread
            with self.lock:
                if isinstance(item, BaseException):  # kept for `wait`: raising here would be the engine's error
                    self.error = item
                    return
                if item is None:
                    self.open -= 1
                    if not self.open:
                        self.end = time.perf_counter()
                        self.done.set()
                    return
                if self.first[i] is None:
                    self.first[i] = time.perf_counter() - self.start
                self.tokens += len(item.token_ids)

        return Stream(1, on_item)

    def wait(self) -> float:
        if not self.done.wait(timeout=3600):
            raise TimeoutError("the streams did not finish")
        if self.error is not None:
            raise self.error
        return self.tokens / (self.end - self.start)


def _run(engines: list[BatchEngine], rows: list[list[int]], adapters: list[str | None], new: int) -> _Clock:
    """One request per row, row i on engines[i % len(engines)] with adapters[i]; returns when all have ended."""
    params = SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[])
    clock = _Clock(len(rows))
    for i, (prompt, adapter) in enumerate(zip(rows, adapters)):
        engines[i % len(engines)].submit(prompt, params, stream=clock.stream(i), adapter=adapter)
    clock.wait()
    return clock


def _measure(engines: list[BatchEngine], rows: list[list[int]], adapters: list[str | None], new: int) -> _Clock:
    _run(engines, rows, adapters, new)  # warm-up: caches grown, threads started
    return _run(engines, rows, adapters, new)


def adapters_rows(job: Job, device: torch.device, dtype: torch.dtype) -> list[Row]:
    model = build_ours(job.shape, device, dtype, lora=False).eval()
    rows = prompts(model.config.vocab_size, job.bsz, job.seq).tolist()
    names = [f"adapter-{i}" for i in range(job.bsz)]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [random_adapter(model, Path(tmp) / name, seed=i) for i, name in enumerate(names)]
        # The previous design first, on the plain model: one engine per adapter, each its own model on the shared
        # base weights (load_adapter), one stream each.
        own = [BatchEngine(load_adapter(model, d), None, max_batch_size=1, max_seq_length=job.seq + job.new)
               for d in dirs]
        per_adapter = _measure(own, rows, [None] * job.bsz, job.new)
        for engine in own:
            engine.close()
        del own
        free_memory(device)
        pool = AdapterPool(model, capacity=job.bsz)
        for name, d in zip(names, dirs):
            pool.load(name, d)
    engine = BatchEngine(model, None, max_batch_size=job.bsz, max_seq_length=job.seq + job.new, adapters=pool)
    base = _measure([engine], rows, [None] * job.bsz, job.new)
    mixed = _measure([engine], rows, list(names), job.new)
    engine.close()
    del engine, pool, model
    free_memory(device)
    setting = f"{job.bsz} streams, {job.seq}+{job.new}, rank {RANK}"
    return [
        Row("mixed adapters", job.shape, f"{setting}, vs one engine per adapter", "tok/s", ours=mixed.wait(),
            hf=per_adapter.wait(), note=f"peer: the previous design ({job.bsz} engines); target >= 4x on the CPU"),
        Row("mixed adapters", job.shape, f"{setting}, vs all on the base", "tok/s", ours=mixed.wait(),
            hf=base.wait(), note="peer: the same engine with every stream on the base; target >= 0.75x"),
    ]


def streams_row(job: Job, device: torch.device, dtype: torch.dtype) -> Row:
    model = build_ours(job.shape, device, dtype, lora=False).eval()
    rows = prompts(model.config.vocab_size, job.bsz, job.seq).tolist()
    engine = BatchEngine(model, None, max_batch_size=job.bsz, max_seq_length=job.seq + job.new)
    one = _measure([engine], rows[:1], [None], job.new)
    many = _measure([engine], rows, [None] * job.bsz, job.new)
    engine.close()
    del engine, model
    free_memory(device)
    firsts = sorted(t for t in many.first if t is not None)
    row = Row("concurrent streams", job.shape, f"{job.bsz} streams vs 1, {job.seq}+{job.new}", "tok/s",
              ours=many.wait(), hf=one.wait(),
              note=f"peer: one stream alone; time to first token p50 {1e3 * statistics.median(firsts):.0f} ms, "
                   f"p99 {1e3 * p99(firsts):.0f} ms")
    row.extra = {"ttft_s": firsts}
    return row


def served_step_row(job: Job, device: torch.device, dtype: torch.dtype) -> Row:
    model = build_ours(job.shape, device, dtype, lora=False).eval()
    rows = prompts(model.config.vocab_size, job.bsz, job.seq).tolist()
    clocks, compiled = {}, True
    for side in (True, False):
        engine = BatchEngine(model, None, max_batch_size=job.bsz, max_seq_length=job.seq + job.new, compile=side)
        clocks[side] = _measure([engine], rows, [None] * job.bsz, job.new)
        compiled = compiled and (engine.compile or not side)  # False when the compiled step fell back to eager
        engine.close()
        free_memory(device)
    note = "peer: the same engine's eager step (the previous design)"
    return Row("served step", job.shape, f"{job.bsz} streams, {job.seq}+{job.new}, compiled vs eager", "tok/s",
               ours=clocks[True].wait(), hf=clocks[False].wait(),
               note=note if compiled else note + "; the compiled step failed and fell back to eager (see warnings)")


def _gaps_while(engine: BatchEngine, rows: list[list[int]], new: int,
                disturb: Callable[[], None]) -> tuple[list[float], list[float], float]:
    """Inter-token gaps of one stream per row, steady (every stream past its prefill, before `disturb` starts) and
    during `disturb` (called once the streams decode steadily); and how long `disturb` took."""
    params = SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=[])
    arrivals: list[list[float]] = [[] for _ in rows]
    ended = threading.Semaphore(0)

    def recorder(i: int) -> Stream:
        def on_item(item: Delta | BaseException | None) -> None:
            if isinstance(item, Delta) and item.token_ids:
                arrivals[i].append(time.perf_counter())
            elif item is None or isinstance(item, BaseException):
                ended.release()

        return Stream(1, on_item)

    for i, prompt in enumerate(rows):
        engine.submit(prompt, params, stream=recorder(i))
    while min(len(a) for a in arrivals) < new // 4:  # steady decoding first
        time.sleep(0.001)
    began = time.perf_counter()
    disturb()
    done = time.perf_counter()
    for _ in rows:
        ended.acquire(timeout=3600)
    decoding = max(times[0] for times in arrivals)  # every stream past its prefill: the gaps are decode steps
    steady = [b - a for times in arrivals for a, b in itertools.pairwise(times) if decoding <= a and b < began]
    during = [b - a for times in arrivals for a, b in itertools.pairwise(times) if a < done and b > began]
    return steady, during, done - began


def adapter_load_row(job: Job, device: torch.device, dtype: torch.dtype, loads: int = 4) -> Row:
    """Inter-token latency of B running streams (on the base) while `loads` adapters load into their engine's pool
    from disk: the gaps that overlap the loads against the same streams' steady gaps before them (target: p99 at
    most 2x)."""
    model = build_ours(job.shape, device, dtype, lora=False).eval()
    rows = prompts(model.config.vocab_size, job.bsz, job.seq).tolist()
    pool = AdapterPool(model, capacity=loads)
    engine = BatchEngine(model, None, max_batch_size=job.bsz, max_seq_length=job.seq + job.new, adapters=pool)
    _run([engine], rows, [None] * job.bsz, 4)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [random_adapter(model, Path(tmp) / f"adapter-{i}", seed=i) for i in range(loads)]

        def load(into: AdapterPool = pool) -> None:
            for i, d in enumerate(dirs):
                into.load(f"adapter-{i}", d)

        steady, during, took = _gaps_while(engine, rows, job.new, load)
    engine.close()
    del engine, pool, model
    free_memory(device)
    row = Row("adapter load", job.shape, f"{job.bsz} streams, {job.seq}+{job.new}, {loads} adapters load", "ms")
    if steady and during:
        row.ours, row.hf = 1e3 * p99(during), 1e3 * p99(steady)
        row.note = (f"p99 inter-token latency while loading (ours) against steady (peer); lower is better, "
                    f"ratio target <= 2x; loads took {1e3 * took:.0f} ms, {len(during)} gaps overlap them")
    else:
        row.errors["row"] = f"no gaps to compare ({len(steady)} steady, {len(during)} while loading)"
    row.extra = {"load_s": took, "gaps_steady": len(steady), "gaps_during": len(during)}
    return row


def long_prompt_row(job: Job, device: torch.device, dtype: torch.dtype, chunk: int = PREFILL_CHUNK) -> Row:
    """The worst inter-token gap of B running streams while a `long`-token prompt arrives and is prefilled: a chunk
    a step (engine's `prefill_chunk`, ours) against the whole prompt in one forward (peer: the previous design)."""
    model = build_ours(job.shape, device, dtype, lora=False).eval()
    rows = prompts(model.config.vocab_size, job.bsz, job.seq).tolist()
    long = prompts(model.config.vocab_size, 1, job.long).tolist()[0]
    worst = {chunked: _longest_gap(model, rows, long, job, chunk if chunked else job.long)
             for chunked in (True, False)}
    del model
    return Row("long prompt", job.shape, f"{job.bsz} streams, {job.seq}+{job.new}, a {job.long}-token prompt "
               f"arrives", "ms", ours=1e3 * worst[True], hf=1e3 * worst[False],
               note=f"the running streams' longest gap while it is prefilled: {chunk}-token chunks between "
                    "their steps (ours) against one forward (peer); lower is better")


def _longest_gap(model: Llama, rows: list[list[int]], long: list[int], job: Job, chunk: int) -> float:
    """The running streams' longest gap while `long` is prefilled `chunk` tokens a step."""
    engine = BatchEngine(model, None, max_batch_size=len(rows) + 1, max_seq_length=len(long) + job.new,
                         prefill_chunk=chunk)
    _run([engine], [*rows, long], [None] * (len(rows) + 1), 2)  # warm-up: the cache grown, the shapes seen
    arrived = threading.Event()

    def send() -> None:
        engine.submit(long, SamplingParams(temperature=0, max_new_tokens=1, stop_token_ids=[]),
                      stream=Stream(1, lambda item: arrived.set() if item is None else None))
        arrived.wait(timeout=3600)

    _, during, _ = _gaps_while(engine, rows, job.new, send)
    engine.close()
    free_memory(model.device)
    return max(during)
