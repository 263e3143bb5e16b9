"""LoRA projections as autograd Functions with a hand-derived backward.

Each adapted projection computes y = x W^T + b + s * (drop(x) A^T) B^T with W (out, in) frozen, A (r, in) and
B (out, r) trained, exactly as PEFT's LoRA layer. Eager autograd would keep x, drop(x) and x A^T for backward; these
Functions keep only x (plus, in the MLP, the gate and up pre-activations) and recompute the rest:

    dB = s * dy^T (drop(x) A^T)        dA = s * (dy B)^T drop(x)
    dx = dy W + s * ((dy B) A) * keep / (1 - p)

Every product is bracketed through the rank r, so no (out, in) temporary and no W + BA ever exists. Dropout masks
are not stored: each is regenerated in backward from a seed drawn in forward (one generator per mask).
`lora_qkv` shares x between three projections and sums their dx; `lora_mlp` runs gate/up/SwiGLU/down and writes
the SwiGLU gradients back into its own saved buffers. Grads for W and b are computed only if they require grad.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from unsloth_core.kernels import reference
from unsloth_core.kernels.backend import use_triton
from unsloth_core.kernels.reference import LoRAProj

# ---- dropout, regenerated from a seed ----


def draw_seed() -> int:
    """A dropout seed from torch's global CPU generator (so `torch.manual_seed` and checkpoint recompute replay it)."""
    return int(torch.randint(0, 2**62, ()).item())


def keep_mask(like: Tensor, p: float, seed: int, index: int) -> Tensor:
    """The 0/1 keep mask (in like's dtype) of the `index`-th dropout of a call seeded with `seed`."""
    gen = torch.Generator(device=like.device)
    gen.manual_seed(seed + index)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=gen)


class _Dropout(NamedTuple):
    p: float
    seed: int | None  # None: no dropout (p == 0 or eval)

    def apply(self, x: Tensor, index: int) -> Tensor:
        if self.seed is None:
            return x
        return x * keep_mask(x, self.p, self.seed, index) * (1.0 / (1.0 - self.p))

    def grad(self, dx: Tensor, index: int) -> Tensor:
        """The gradient through the dropout (the same mask and scale), in place on dx."""
        if self.seed is None:
            return dx
        return dx.mul_(keep_mask(dx, self.p, self.seed, index)).mul_(1.0 / (1.0 - self.p))


def _dropout(p: float, training: bool) -> _Dropout:
    return _Dropout(p, draw_seed() if training and p > 0 else None)


# ---- one projection ----


def _forward(x: Tensor, proj: LoRAProj, scale: float, drop: _Dropout, index: int) -> Tensor:
    """x (N, in) -> (N, out); the adapter runs in x's dtype."""
    weight, bias, a, b = proj
    y = F.linear(x, weight, bias)
    y.addmm_(drop.apply(x, index) @ a.to(x.dtype).t(), b.to(x.dtype).t(), alpha=scale)
    return y


def _backward(dy: Tensor, x: Tensor, proj: LoRAProj, scale: float, drop: _Dropout, index: int,
              needs: tuple[bool, ...], dx: Tensor | None) -> tuple[Tensor | None, ...]:
    """(dW, db, dA, dB, dx) of one projection given dy (N, out) and its input x (N, in).

    `needs` says which of (x, W, b, A, B) want a gradient; dx is added into the `dx` passed in (a shared input).
    """
    weight, bias, a, b = proj
    a_, b_ = a.to(dy.dtype), b.to(dy.dtype)
    dy_b = dy @ b_  # (N, r): every adapter gradient goes through this or through x A^T
    d_w = d_bias = d_a = d_b = None
    if needs[3] or needs[4]:
        xd = drop.apply(x, index)
        if needs[3]:
            d_a = (dy_b.t() @ xd).mul_(scale).to(a.dtype)
        if needs[4]:
            d_b = (dy.t() @ (xd @ a_.t())).mul_(scale).to(b.dtype)
    if needs[1]:
        d_w = (dy.t() @ x).to(weight.dtype)
    if needs[2] and bias is not None:
        d_bias = dy.sum(0).to(bias.dtype)
    if needs[0]:
        dx = _add_dx(dx, dy, weight, dy_b, a_, scale, drop, index)
    return d_w, d_bias, d_a, d_b, dx


def _add_dx(dx: Tensor | None, dy: Tensor, weight: Tensor, dy_b: Tensor, a: Tensor, scale: float, drop: _Dropout,
            index: int) -> Tensor:
    """dx + dy W + s * drop'((dy B) A), with no (N, in) temporary when there is no dropout."""
    if drop.seed is None:
        dx = torch.mm(dy, weight) if dx is None else dx.addmm_(dy, weight)
        return dx.addmm_(dy_b, a, alpha=scale)
    lora_dx = drop.grad(dy_b @ a, index).mul_(scale)
    return lora_dx.addmm_(dy, weight) if dx is None else dx.add_(lora_dx).addmm_(dy, weight)


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _unrows(rows: Tensor | None, like: Tensor) -> Tensor | None:
    """rows (N, F) back to like's leading dims."""
    return None if rows is None else rows.view(*like.shape[:-1], rows.shape[-1])


def _projs(flat: tuple[Tensor | None, ...]) -> list[LoRAProj]:
    """Regroup (W, b, A, B, W, b, A, B, ...) as projections."""
    return [(flat[i], flat[i + 1], flat[i + 2], flat[i + 3]) for i in range(0, len(flat), 4)]  # type: ignore[misc]


# The Functions below all take (x, scale, dropout, *flat) with flat = 4 tensors (W, b, A, B) per projection.
_FLAT = 3  # index of the first projection tensor among the inputs


def _needs(ctx: Any, proj: int) -> tuple[bool, ...]:
    """(x, W, b, A, B) gradient flags of projection number `proj`."""
    flags = ctx.needs_input_grad
    first = _FLAT + 4 * proj
    return (flags[0], *flags[first:first + 4])


def _save(ctx: Any, scale: float, drop: _Dropout, *tensors: Tensor | None) -> None:
    ctx.save_for_backward(*tensors)
    ctx.scale, ctx.drop = scale, drop


# ---- o_proj (and any single projection) ----


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, drop: _Dropout, *flat: Tensor | None) -> Tensor:
        rows = _rows(x)
        _save(ctx, scale, drop, rows, *flat)
        return _unrows(_forward(rows, _projs(flat)[0], scale, drop, 0), x)  # type: ignore[return-value]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        rows, *flat = ctx.saved_tensors
        *grads, dx = _backward(_rows(dy), rows, _projs(tuple(flat))[0], ctx.scale, ctx.drop, 0,
                               _needs(ctx, 0), None)
        return _unrows(dx, dy), None, None, *grads


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float,
                dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """x W^T + b + scale * (dropout(x) A^T) B^T for x (..., in), W (out, in), A (r, in), B (out, r)."""
    drop = _dropout(dropout_p, training)
    return LoRALinearFunction.apply(x, scale, drop, weight, bias, lora_a, lora_b)


# ---- q, k, v from one input ----


class LoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, drop: _Dropout,
                *flat: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        rows = _rows(x)
        _save(ctx, scale, drop, rows, *flat)
        # Three separate outputs, not views of one fused product: RoPE rotates q and k in place afterwards.
        q, k, v = (_unrows(_forward(rows, proj, scale, drop, i), x) for i, proj in enumerate(_projs(flat)))
        return q, k, v  # type: ignore[return-value]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        rows, *flat = ctx.saved_tensors
        dx: Tensor | None = None
        param_grads: list[Tensor | None] = []
        for i, (proj, dy) in enumerate(zip(_projs(tuple(flat)), grads, strict=True)):
            *pg, dx = _backward(_rows(dy), rows, proj, ctx.scale, ctx.drop, i, _needs(ctx, i), dx)
            param_grads += pg
        return _unrows(dx, grads[0]), None, None, *param_grads


def lora_qkv(x: Tensor, q: LoRAProj, k: LoRAProj, v: LoRAProj, scale: float, dropout_p: float = 0.0,
             training: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The q, k and v `lora_linear` projections of one x (..., C), sharing x in backward and summing its gradient.

    Each projection is (W, b or None, lora_A.weight, lora_B.weight) and gets its own dropout mask, as in PEFT.
    """
    drop = _dropout(dropout_p, training)
    return LoRAQKVFunction.apply(x, scale, drop, *q, *k, *v)


# ---- gate, up, SwiGLU, down ----


def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    if use_triton("swiglu", gate):
        from unsloth_core.kernels.glu import swiglu_forward

        return swiglu_forward(gate, up)
    return reference.swiglu(gate, up)


def _swiglu_backward(dh: Tensor, gate: Tensor, up: Tensor, in_place: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(h, d gate, d up); with `in_place`, written into dh, gate and up themselves."""
    if use_triton("swiglu", gate):
        from unsloth_core.kernels.glu import swiglu_backward

        out = (dh, gate, up) if in_place else (torch.empty_like(dh), torch.empty_like(gate), torch.empty_like(up))
        swiglu_backward(dh, gate, up, out)
        return out
    return reference.swiglu_backward(dh, gate, up)


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, drop: _Dropout, *flat: Tensor | None) -> Tensor:
        gate, up, down = _projs(flat)
        rows = _rows(x)
        e = _forward(rows, gate, scale, drop, 0)
        g = _forward(rows, up, scale, drop, 1)
        _save(ctx, scale, drop, rows, e, g, *flat)
        return _unrows(_forward(_swiglu(e, g), down, scale, drop, 2), x)  # type: ignore[return-value]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy_in: Tensor) -> tuple[Tensor | None, ...]:
        rows, e, g, *flat = ctx.saved_tensors
        gate, up, down = _projs(tuple(flat))
        scale, drop = ctx.scale, ctx.drop
        dy = _rows(dy_in)
        # dh through the down projection needs only dy; h itself comes back from the SwiGLU backward.
        w_d, _, a_d, b_d = down
        dh = _add_dx(None, dy, w_d, dy @ b_d.to(dy.dtype), a_d.to(dy.dtype), scale, drop, 2)
        # e and g are this Function's own buffers: overwrite them, unless a retained graph will read them again.
        in_place = not torch._C._autograd._get_current_graph_task_keep_graph()
        h, de, dg = _swiglu_backward(dh, e, g, in_place)
        down_grads = _backward(dy, h, down, scale, drop, 2, (False, *_needs(ctx, 2)[1:]), None)[:4]
        del h, dh
        *up_grads, dx = _backward(dg, rows, up, scale, drop, 1, _needs(ctx, 1), None)
        *gate_grads, dx = _backward(de, rows, gate, scale, drop, 0, _needs(ctx, 0), dx)
        return _unrows(dx, dy_in), None, None, *gate_grads, *up_grads, *down_grads


def lora_mlp(x: Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj, scale: float, dropout_p: float = 0.0,
             training: bool = False) -> Tensor:
    """down(silu(gate(x)) * up(x)) with every projection a `lora_linear`; saves x, gate(x) and up(x) only."""
    drop = _dropout(dropout_p, training)
    return LoRAMLPFunction.apply(x, scale, drop, *gate, *up, *down)
