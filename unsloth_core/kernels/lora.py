"""LoRA projections as autograd Functions with a hand-derived backward.

Each adapted projection computes y = x W^T + b + s * (drop(x) A^T) B^T with W (out, in) frozen, A (r, in) and
B (out, r) trained, exactly as PEFT's LoRA layer. Eager autograd would keep x, drop(x) and x A^T for backward; these
Functions keep x and the thin drop(x) A^T (N, r) (plus, in the MLP, the gate and up pre-activations) and recompute
the rest:

    dB = s * dy^T (drop(x) A^T)        dA = s * (dy B)^T drop(x)
    dx = dy W + s * ((dy B) A) * keep / (1 - p)

Every product is bracketed through the rank r, so no (out, in) temporary and no W + BA ever exists. A 4-bit (NF4)
W is saved as it is and dequantized into a temporary for each product that needs it (see quant.py). Dropout masks
are not stored: each is regenerated in backward from a seed drawn in forward (one generator per mask).
`lora_qkv` shares x between three projections and sums their dx, and without dropout runs the A-side products of
all three as one GEMM against the concatenated A matrices (likewise gate and up in `lora_mlp`, which runs
gate/up/SwiGLU/down and writes the SwiGLU gradients back into its own saved buffers). Grads for W and b are
computed only if they require grad.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

import unsloth_core.quant as quant  # a module import: quant.py imports this package in turn
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


def _autocast_input(x: Tensor) -> Tensor:
    """x in autocast's dtype when autocast is on. The Functions' `out=` and in-place products are not autocast, and
    a trained fp32 embedding makes the residual stream fp32 while the frozen weights are bf16; autograd casts the
    input's gradient back."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


# ---- projections sharing one input ----


def _lora_in(x: Tensor, projs: list[LoRAProj], drop: _Dropout, first: int) -> Tensor:
    """drop(x) A_i^T for each projection, side by side (N, sum r_i): one GEMM over the concatenated A matrices
    when there is no dropout (the rank-r products are too thin to run well one by one), else one per mask."""
    if drop.seed is None:
        a = torch.cat([p[2] for p in projs]).to(x.dtype) if len(projs) > 1 else projs[0][2].to(x.dtype)
        return x @ a.t()
    return torch.cat([drop.apply(x, first + i) @ p[2].to(x.dtype).t() for i, p in enumerate(projs)], dim=1)


def _ranks(projs: list[LoRAProj]) -> list[int]:
    return [p[2].size(0) for p in projs]


def _project(x: Tensor, proj: LoRAProj, scale: float, xa: Tensor) -> Tensor:
    """x W^T + b + s * xa B^T, xa = drop(x) A^T computed (and kept) by the caller."""
    weight, bias, _, b = proj
    return F.linear(x, quant.dense(weight), bias).addmm_(xa, b.to(x.dtype).t(), alpha=scale)


def _project_base(x: Tensor, rows: Tensor, proj: LoRAProj, scale: float, xa: Tensor) -> Tensor:
    """`_project` with x's leading dims, in a tensor of its own. A Function with several outputs must not return
    views (autograd then forbids in-place changes to them), and RoPE rotates q and k in place."""
    weight, bias, _, b = proj
    weight = quant.dense(weight)
    out = rows.new_empty(*x.shape[:-1], weight.shape[0])
    flat = out.view(-1, weight.shape[0])
    if bias is None:
        torch.mm(rows, weight.t(), out=flat)
    else:
        torch.addmm(bias, rows, weight.t(), out=flat)
    flat.addmm_(xa, b.to(rows.dtype).t(), alpha=scale)
    return out


def _backward(dys: list[Tensor], x: Tensor, xa: Tensor, projs: list[LoRAProj], scale: float, drop: _Dropout,
              first: int, needs: list[tuple[bool, ...]], dx: Tensor | None
              ) -> tuple[list[Tensor | None], Tensor | None]:
    """Gradients of projections sharing input x (N, in), given each one's dy (N, out_i) and the saved xa.

    Returns [dW, db, dA, dB] per projection (flattened) and dx added into `dx`. `needs[i]` flags (x, W, b, A, B).
        dB_i = s dy_i^T xa_i      dA_i = s (dy_i B_i)^T drop_i(x)      dx = sum_i dy_i W_i + s drop_i'((dy_i B_i) A_i)
    Every product goes through the rank r, so no (out, in) temporary exists; with no dropout the A-side products of
    the whole group are one GEMM each.
    """
    dy_bs = [dy @ p[3].to(dy.dtype) for dy, p in zip(dys, projs)]  # (N, r_i)
    xas = xa.split(_ranks(projs), dim=1)
    d_as: list[Tensor | None] = [None] * len(projs)
    if any(n[3] for n in needs):
        if drop.seed is None:
            d_as = list((torch.cat(dy_bs, dim=1).t() @ x).mul_(scale).split(_ranks(projs), dim=0))
        else:
            d_as = [(dy_b.t() @ drop.apply(x, first + i)).mul_(scale) for i, dy_b in enumerate(dy_bs)]
    grads: list[Tensor | None] = []
    for (weight, bias, a, b), dy, xa_i, d_a, n in zip(projs, dys, xas, d_as, needs):
        grads += [
            (dy.t() @ x).to(weight.dtype) if n[1] else None,
            dy.sum(0).to(bias.dtype) if n[2] and bias is not None else None,
            d_a.to(a.dtype) if n[3] and d_a is not None else None,
            (dy.t() @ xa_i).mul_(scale).to(b.dtype) if n[4] else None,
        ]
    if any(n[0] for n in needs):
        dx = _add_dx(dx, dys, x.dtype, projs, dy_bs, scale, drop, first)
    return grads, dx


def _add_dx(dx: Tensor | None, dys: list[Tensor], dtype: torch.dtype, projs: list[LoRAProj], dy_bs: list[Tensor],
            scale: float, drop: _Dropout, first: int) -> Tensor:
    """dx + sum_i dy_i W_i + s drop_i'((dy_i B_i) A_i), accumulated in place (no (N, in) temporary without
    dropout)."""
    for dy, (weight, *_rest) in zip(dys, projs):
        w = quant.dense(weight, dy.dtype)  # a 4-bit base weight is dequantized here, used, and dropped
        dx = torch.mm(dy, w) if dx is None else dx.addmm_(dy, w)
    assert dx is not None
    if drop.seed is None:
        a = torch.cat([p[2] for p in projs]).to(dtype) if len(projs) > 1 else projs[0][2].to(dtype)
        return dx.addmm_(torch.cat(dy_bs, dim=1) if len(dy_bs) > 1 else dy_bs[0], a, alpha=scale)
    for i, (dy_b, p) in enumerate(zip(dy_bs, projs)):
        dx.add_(drop.grad(dy_b @ p[2].to(dtype), first + i).mul_(scale))
    return dx


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
        rows, projs = _rows(x), _projs(flat)
        xa = _lora_in(rows, projs, drop, 0)
        _save(ctx, scale, drop, rows, xa, *flat)
        return _unrows(_project(rows, projs[0], scale, xa), x)  # type: ignore[return-value]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        rows, xa, *flat = ctx.saved_tensors
        grads, dx = _backward([_rows(dy)], rows, xa, _projs(tuple(flat)), ctx.scale, ctx.drop, 0,
                              [_needs(ctx, 0)], None)
        return _unrows(dx, dy), None, None, *grads


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float,
                dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """x W^T + b + scale * (dropout(x) A^T) B^T for x (..., in), W (out, in), A (r, in), B (out, r)."""
    drop = _dropout(dropout_p, training)
    return LoRALinearFunction.apply(_autocast_input(x), scale, drop, weight, bias, lora_a, lora_b)


# ---- q, k, v from one input ----


class LoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float, drop: _Dropout,
                *flat: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        rows, projs = _rows(x), _projs(flat)
        xa = _lora_in(rows, projs, drop, 0)  # (N, 3r): kept, it is small
        _save(ctx, scale, drop, rows, xa, *flat)
        # Three tensors of their own, not views (of one fused product, or of 2-D results): RoPE rotates q and k in
        # place afterwards, which autograd forbids on the views a multi-output Function returns.
        q, k, v = (_project_base(x, rows, proj, scale, xa_i)
                   for proj, xa_i in zip(projs, xa.split(_ranks(projs), dim=1)))
        return q, k, v

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        rows, xa, *flat = ctx.saved_tensors
        param_grads, dx = _backward([_rows(g) for g in grads], rows, xa, _projs(tuple(flat)), ctx.scale, ctx.drop,
                                    0, [_needs(ctx, i) for i in range(3)], None)
        return _unrows(dx, grads[0]), None, None, *param_grads


def lora_qkv(x: Tensor, q: LoRAProj, k: LoRAProj, v: LoRAProj, scale: float, dropout_p: float = 0.0,
             training: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The q, k and v `lora_linear` projections of one x (..., C), sharing x in backward and summing its gradient.

    Each projection is (W, b or None, lora_A.weight, lora_B.weight) and gets its own dropout mask, as in PEFT.
    """
    drop = _dropout(dropout_p, training)
    return LoRAQKVFunction.apply(_autocast_input(x), scale, drop, *q, *k, *v)


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
        xa = _lora_in(rows, [gate, up], drop, 0)  # (N, 2r)
        xa_g, xa_u = xa.split(_ranks([gate, up]), dim=1)
        e, g = _project(rows, gate, scale, xa_g), _project(rows, up, scale, xa_u)
        h = _swiglu(e, g)
        ha = _lora_in(h, [down], drop, 2)  # (N, r); h itself is recomputed in backward
        _save(ctx, scale, drop, rows, e, g, xa, ha, *flat)
        return _unrows(_project(h, down, scale, ha), x)  # type: ignore[return-value]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy_in: Tensor) -> tuple[Tensor | None, ...]:
        rows, e, g, xa, ha, *flat = ctx.saved_tensors
        gate, up, down = _projs(tuple(flat))
        scale, drop = ctx.scale, ctx.drop
        dy = _rows(dy_in)
        # dh through the down projection needs only dy; h itself comes back from the SwiGLU backward.
        dh = _add_dx(None, [dy], dy.dtype, [down], [dy @ down[3].to(dy.dtype)], scale, drop, 2)
        # e and g are this Function's own buffers: overwrite them, unless a retained graph will read them again.
        in_place = not torch._C._autograd._get_current_graph_task_keep_graph()
        h, de, dg = _swiglu_backward(dh, e, g, in_place)
        needs_down = (False, *_needs(ctx, 2)[1:])
        down_grads, _ = _backward([dy], h, ha, [down], scale, drop, 2, [needs_down], None)
        del h, dh
        gate_up_grads, dx = _backward([de, dg], rows, xa, [gate, up], scale, drop, 0,
                                      [_needs(ctx, 0), _needs(ctx, 1)], None)
        return _unrows(dx, dy_in), None, None, *gate_up_grads, *down_grads


def lora_mlp(x: Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj, scale: float, dropout_p: float = 0.0,
             training: bool = False) -> Tensor:
    """down(silu(gate(x)) * up(x)) with every projection a `lora_linear`; saves x, gate(x) and up(x) only."""
    drop = _dropout(dropout_p, training)
    return LoRAMLPFunction.apply(_autocast_input(x), scale, drop, *gate, *up, *down)
