"""RMSNorm in Triton: one program per row forward; backward that computes dW only when the weight trains.

Forward saves x, the weight and a single fp32 inverse RMS per row, nothing the size of the output. Numerics follow
HF: the statistic in fp32, the normalised row rounded to x's dtype, then multiplied by the weight.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from unsloth_core.kernels.launch import as_rows, num_warps, program_slots, row_block


@triton.jit
def _rms_norm_forward(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps,  # type: ignore[no-untyped-def]
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # HF rounds to x's dtype before the weight
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, normed * w, mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx,  # type: ignore[no-untyped-def]
                       n_rows, n_cols, BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr):
    # Each program walks rows pid, pid + P, ...: with dW, P is a few programs per SM so each keeps one partial dW
    # row in registers (P partial rows summed afterwards, instead of an n_rows x n_cols buffer); without dW, P = rows.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, n_rows, tl.num_programs(0)):
        r = tl.cast(row, tl.int64)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r)
        xhat = x * rstd
        dn = dy * w  # gradient w.r.t. the normalised row
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / n_cols))
        tl.store(DX + r * stride_dx + cols, dx, mask=mask)
        if COMPUTE_DW:
            dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * BLOCK + cols, dw, mask=mask)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        rows = as_rows(x)
        n_rows, n_cols = rows.shape
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = row_block(n_cols)
        weight = weight.contiguous()
        _rms_norm_forward[(n_rows,)](rows, weight, y, rstd, rows.stride(0), y.stride(0), n_cols, eps,
                                     BLOCK=block, num_warps=num_warps(block))
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor | None, None]:
        rows, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = rows.shape
        dy_rows = as_rows(dy)
        dx = torch.empty_like(rows)
        compute_dw = ctx.needs_input_grad[1]
        block = row_block(n_cols)
        programs = min(n_rows, program_slots(rows.device)) if compute_dw else n_rows
        # Without dW the partial buffer is never written; dx stands in for the pointer.
        partial = torch.empty(programs, block, dtype=torch.float32, device=rows.device) if compute_dw else dx
        _rms_norm_backward[(programs,)](dy_rows, rows, weight, rstd, dx, partial, dy_rows.stride(0), rows.stride(0),
                                        dx.stride(0), n_rows, n_cols, BLOCK=block, COMPUTE_DW=compute_dw,
                                        num_warps=num_warps(block))
        dw = partial[:, :n_cols].sum(0).to(weight.dtype) if compute_dw else None
        return dx.view(dy.shape), dw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim, as `reference.rms_norm`."""
    return RMSNormFunction.apply(x, weight, eps)
