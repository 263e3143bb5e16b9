"""Batched LoRA for serving in Triton: every row of a batch adds the low-rank update of its own adapter.

Punica's BGMV split in two kernels. `shrink`: one program per row computes t = scale * A[s] x (R values, fp32), the
row's adapter read through `index`, A's rank padded with zeros in the stacked pool. `expand`: one program per
(row, block of outputs) adds B[s] t to y in place. A row with index -1 (the base model) does nothing. The twin is
`reference.lora_bgmv_`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from unsloth_core.kernels.launch import next_power_of_2

BLOCK_I = 128  # input features read per loop step of `shrink`
BLOCK_O = 128  # outputs written per program of `expand`


@triton.jit
def _shrink(X, A, SCALES, INDEX, T, n_in, rank,  # type: ignore[no-untyped-def]
            BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(INDEX + row).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if s >= 0:
        for start in range(0, n_in, BLOCK_I):
            cols = start + tl.arange(0, BLOCK_I)
            x = tl.load(X + row * n_in + cols, mask=cols < n_in, other=0.0).to(tl.float32)
            a = tl.load(A + (s * rank + r[:, None]) * n_in + cols[None, :],
                        mask=(r[:, None] < rank) & (cols[None, :] < n_in), other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        acc = acc * tl.load(SCALES + s)
    tl.store(T + row * BLOCK_R + r, acc)


@triton.jit
def _expand(T, B, INDEX, Y, n_out, rank,  # type: ignore[no-untyped-def]
            BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(INDEX + row).to(tl.int64)
    if s >= 0:
        outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        r = tl.arange(0, BLOCK_R)
        t = tl.load(T + row * BLOCK_R + r)
        b = tl.load(B + (s * rank + r[None, :]) * n_out + outs[:, None],
                    mask=(outs[:, None] < n_out) & (r[None, :] < rank), other=0.0).to(tl.float32)
        delta = tl.sum(b * t[None, :], axis=1)
        y = tl.load(Y + row * n_out + outs, mask=outs < n_out, other=0.0)
        tl.store(Y + row * n_out + outs, (y.to(tl.float32) + delta).to(Y.dtype.element_ty), mask=outs < n_out)


def lora_bgmv_(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scales: Tensor, index: Tensor) -> Tensor:
    """Same contract as `reference.lora_bgmv_`: y (N, O) updated in place and returned."""
    n, n_in = x.shape
    rank, n_out = a.size(1), b.size(2)
    x, y_work = x.contiguous(), y if y.is_contiguous() else y.contiguous()
    block_r = max(16, next_power_of_2(rank))
    t = torch.empty(n, block_r, dtype=torch.float32, device=x.device)
    index = index.to(torch.int32).contiguous()
    _shrink[(n,)](x, a.contiguous(), scales.contiguous(), index, t, n_in, rank, BLOCK_R=block_r, BLOCK_I=BLOCK_I)
    _expand[(n, triton.cdiv(n_out, BLOCK_O))](t, b.contiguous(), index, y_work, n_out, rank, BLOCK_R=block_r,
                                              BLOCK_O=BLOCK_O)
    if y_work is not y:
        y.copy_(y_work)
    return y
