"""SwiGLU in Triton: h = silu(gate) * up forward, and a backward that can write into the buffers it reads.

Forward keeps HF's rounding: silu in fp32, cast to the input dtype, then the product. The autograd Function saves
only gate and up (eager autograd would also keep silu(gate)); backward recomputes sigmoid from gate.

`swiglu_backward` takes its output buffers explicitly and touches each element once (load, then store at the same
offset), so any output may alias any input: the fused LoRA MLP passes its own gate/up buffers and gets the gradients
back in them with no new activation memory.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

BLOCK = 1024


@triton.jit
def _swiglu_forward(E, G, H, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    f = (e * tl.sigmoid(e)).to(E.dtype.element_ty).to(tl.float32)  # silu rounded to the dtype, as F.silu returns it
    tl.store(H + offs, f * g, mask=mask)


@triton.jit
def _swiglu_backward(DH, E, G, H_OUT, DE_OUT, DG_OUT, n,  # type: ignore[no-untyped-def]
                     BLOCK: tl.constexpr, STORE_H: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(E + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(e)
    f = (e * sig).to(E.dtype.element_ty).to(tl.float32)
    # d silu(e)/de = sig * (1 + e * (1 - sig))
    de = dh * g * sig * (1.0 + e * (1.0 - sig))
    dg = dh * f
    if STORE_H:
        tl.store(H_OUT + offs, f * g, mask=mask)
    tl.store(DE_OUT + offs, de, mask=mask)
    tl.store(DG_OUT + offs, dg, mask=mask)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def swiglu_forward(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for contiguous tensors of one shape and dtype."""
    h = torch.empty_like(gate)
    _swiglu_forward[_grid(h.numel())](gate, up, h, h.numel(), BLOCK=BLOCK)
    return h


def swiglu_backward(dh: Tensor, gate: Tensor, up: Tensor, out: tuple[Tensor | None, Tensor, Tensor]) -> None:
    """Write (h, d gate, d up) into `out` = (h or None, de, dg); every buffer contiguous, one shape.

    Outputs may be the very input buffers (h into dh, de into gate, dg into up): each element is read before its
    slot is written. `h` (the recomputed forward) is for callers that need it for weight gradients.
    """
    h, de, dg = out
    _swiglu_backward[_grid(dh.numel())](dh, gate, up, de if h is None else h, de, dg, dh.numel(), BLOCK=BLOCK,
                                        STORE_H=h is not None)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor, inplace_backward: bool) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.inplace_backward = inplace_backward
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor, Tensor, None]:
        gate, up = ctx.saved_tensors
        keep_graph = torch._C._autograd._get_current_graph_task_keep_graph()
        if ctx.inplace_backward and not keep_graph:
            de, dg = gate, up
        else:
            de, dg = torch.empty_like(gate), torch.empty_like(up)
        swiglu_backward(dh.contiguous(), gate, up, (None, de, dg))
        return de, dg, None


def swiglu(gate: Tensor, up: Tensor, *, inplace_backward: bool = False) -> Tensor:
    """silu(gate) * up, as `reference.swiglu`.

    `inplace_backward=True` lets backward write the gradients into the saved gate and up buffers instead of new ones.
    Only pass it when gate and up are private temporaries nothing else reads afterwards (an MLP's projection outputs);
    a retained graph (`retain_graph=True`) always gets fresh buffers, since its saved tensors are read again.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match")
    return SwiGLUFunction.apply(gate, up, inplace_backward)
