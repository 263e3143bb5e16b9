"""Each fused op's Triton kernel against its plain-torch twin, forward and backward, at a model's training shape.

This is the evidence `AUTO_TRITON_OPS` (unsloth_core/kernels/backend.py) is to follow: an op's kernel runs by
default on a GPU only where its row shows it beating the twin there. In these rows the "ours" column is the Triton
kernel and the "HF + PEFT" column is our plain-torch twin (what the `reference` backend runs), both in calls/s; the
memory columns are each side's peak while its calls run. The GPU plan runs them; on a CPU the kernels only run under
Triton's interpreter, which times nothing useful (tests run the rows that way, on tiny shapes, to keep them working).

Each call returns its input gradients (`torch.autograd.grad`) rather than accumulating them into `.grad`: an
accumulation would add a read-modify-write of every gradient to each call after the first, on both sides.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bench.models import PeakMemory, config, free_memory
from bench.report import Row
from bench.workloads import Job, short, sync
from unsloth_core import kernels
from unsloth_core.kernels.backend import AUTO_TRITON_OPS
from unsloth_core.kernels.cross_entropy import linear_cross_entropy
from unsloth_core.quant import NF4Tensor

Call = Callable[[], Any]  # one forward + backward (or one dequantization) of an op


def _randn(*shape: int, device: torch.device, dtype: torch.dtype, grad: bool = False, seed: int = 0) -> Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_(grad)


def cases(job: Job, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[str, Callable[[bool], Call]]]:
    """op -> (setting, make) where make(use_triton) returns the call to time, inputs built once."""
    cfg = config(job.shape)
    n, c, inter, d = job.bsz * job.seq, cfg.hidden_size, cfg.intermediate_size, cfg.d_head
    kw: dict[str, Any] = {"device": device, "dtype": dtype}

    def rms_norm(_: bool) -> Call:
        x, w, dy = _randn(n, c, grad=True, **kw), torch.ones(c, **kw), _randn(n, c, seed=1, **kw)
        return lambda: torch.autograd.grad(kernels.rms_norm(x, w, cfg.rms_norm_eps), x, dy)

    def rope(_: bool) -> Call:
        q = _randn(job.bsz, cfg.num_attention_heads, job.seq, d, grad=True, **kw)
        k = _randn(job.bsz, cfg.n_kv_heads, job.seq, d, grad=True, seed=1, **kw)
        cos, sin = _randn(job.bsz, job.seq, d, seed=2, **kw), _randn(job.bsz, job.seq, d, seed=3, **kw)
        dq, dk = torch.ones_like(q), torch.ones_like(k)

        def call() -> Any:
            qo, ko = kernels.rope(q * 1, k * 1, cos, sin)  # private temporaries: the kernel rotates in place
            return torch.autograd.grad([qo, ko], [q, k], [dq, dk])

        return call

    def swiglu(_: bool) -> Call:
        gate, up = _randn(n, inter, grad=True, **kw), _randn(n, inter, grad=True, seed=1, **kw)
        dh = _randn(n, inter, seed=2, **kw)
        return lambda: torch.autograd.grad(kernels.swiglu(gate * 1, up * 1, inplace_backward=True), [gate, up], dh)

    def cross_entropy(use_triton: bool) -> Call:
        # Both sides chunked: the choice `auto` makes is only the in-chunk softmax/gradient (kernel or torch).
        hidden, weight = _randn(n, c, grad=True, **kw), _randn(cfg.vocab_size, c, seed=1, **kw).mul_(0.02)
        labels = torch.randint(0, cfg.vocab_size, (n,), device=device, generator=torch.Generator(device=device))
        return lambda: torch.autograd.grad(linear_cross_entropy(hidden, weight, labels, use_triton=use_triton)[0],
                                           hidden)

    def nf4_dequantize(_: bool) -> Call:
        q = NF4Tensor.from_dense(_randn(inter, c, **kw), dtype=dtype)
        return lambda: q.dense()

    def lora_bgmv(_: bool) -> Call:
        # A serving decode step's batched LoRA: 32 rows, each on one of 16 rank-16 adapters, one q-sized projection.
        rows, slots, rank = 32, 16, 16
        x, y = _randn(rows, c, **kw), _randn(rows, c, seed=1, **kw)
        # The pool keeps adapters in fp32 (adapters.py), whatever the base's dtype.
        fp32: dict[str, Any] = {"device": device, "dtype": torch.float32}
        a, b = _randn(slots, rank, c, seed=2, **fp32).mul_(0.02), _randn(slots, rank, c, seed=3, **fp32).mul_(0.02)
        scales = torch.ones(slots, device=device, dtype=torch.float32)
        index = torch.arange(rows, device=device) % slots
        return lambda: kernels.lora_bgmv_(y, x, a, b, scales, index)

    return {
        "rms_norm": (f"{n}x{c}, fwd+bwd", rms_norm),
        "rope": (f"q {job.bsz}x{cfg.num_attention_heads}x{job.seq}x{d}, fwd+bwd", rope),
        "swiglu": (f"{n}x{inter}, fwd+bwd", swiglu),
        "cross_entropy": (f"{n}x{c} @ {cfg.vocab_size}, fwd+bwd, chunked", cross_entropy),
        "nf4_dequantize": (f"{inter}x{c} -> {str(dtype).removeprefix('torch.')}", nf4_dequantize),
        "lora_bgmv": (f"32 rows on 16 adapters, r16, {c}->{c}, y += (x A^T) B", lora_bgmv),
    }


def triton_do_bench() -> Callable[..., float] | None:
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def seconds_per_call(call: Call, device: torch.device, reps: int) -> tuple[float, str]:
    """(seconds per call, how it was timed), the call warm already.

    On a GPU a kernel at a model's shape runs for tens of microseconds, about what a launch and a host sync cost, so
    single calls timed by the host clock would measure those. There the time is taken on the device: Triton's
    do_bench (CUDA events around each call, the L2 cache flushed in between, as a training step finds it), else
    `reps` calls queued back to back between two events. On the CPU each call is timed alone (the median).
    """
    if device.type == "cuda":
        do_bench = triton_do_bench()
        if do_bench is not None:
            return do_bench(call, warmup=25, rep=100, return_mode="median") / 1e3, "median of do_bench (CUDA events)"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        for _ in range(reps):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps, f"mean of {reps} back-to-back calls (CUDA events)"
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), f"median of {reps} calls"


def time_calls(call: Call, device: torch.device, warmup: int, reps: int) -> tuple[float, float | None, str]:
    """(seconds per call, peak GiB while calling, how it was timed). The peak is read over the warm-up calls, apart
    from the timing: do_bench's own cache-flush buffer would otherwise count."""
    with PeakMemory(device) as mem:
        for _ in range(warmup):
            call()
        sync(device)
    seconds, how = seconds_per_call(call, device, reps)
    return seconds, mem.gib, f"{how} after {warmup} warm-up"


def kernel_rows(job: Job, device: torch.device, dtype: torch.dtype, warmup: int = 3, reps: int = 10) -> list[Row]:
    rows = []
    before = kernels.get_backend()
    for op, (setting, make) in cases(job, device, dtype).items():
        row = Row("kernel", op, f"{job.shape}: {setting}", "calls/s", mem=PeakMemory.kind(device))
        for side, backend in (("ours", "triton"), ("hf", "reference")):
            try:
                kernels.set_backend(backend)
                seconds, gib, row.timing = time_calls(make(backend == "triton"), device, warmup, reps)
                setattr(row, side, 1.0 / seconds)
                setattr(row, f"{side}_mem_gib", gib)
            except Exception as e:
                row.errors[side] = short(e)
            finally:
                kernels.set_backend(before)
                free_memory(device)
        on = op in AUTO_TRITON_OPS
        row.note = f"ours: Triton, HF column: the torch twin; auto runs Triton on a GPU: {'yes' if on else 'no'}"
        row.extra["auto_triton"] = on
        rows.append(row)
    return rows
