"""RoPE in Triton: Q and K rotated in one launch, in place, straight from their strided (B, H, T, D) views.

One program owns one token: it loads that token's cos/sin row once and rotates every query head and every key head
with it, so the tables are read once per token rather than once per head. Strides are passed through, so the
transposed views of the projection outputs are rotated where they lie, with no copy or transpose. The tables are
per (batch, token), which is what makes per-sample position ids (packed sequences restarting at 0) work.

Backward applies the transposed rotation (the forward one with sin negated) to the incoming gradients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from unsloth_core.kernels.launch import is_dense, next_power_of_2


@triton.jit
def _rotate_heads(IN, OUT, stride_h, stride_d, n_heads, half, c1, c2, s1, s2,  # type: ignore[no-untyped-def]
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, TRANSPOSE: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < half)
    first = heads * stride_h + cols * stride_d  # offsets of the first half of each head
    second = first + half * stride_d
    x1 = tl.load(IN + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(IN + second, mask=mask, other=0.0).to(tl.float32)
    # HF half-split layout: y = x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1).
    if TRANSPOSE:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(OUT + first, y1, mask=mask)
    tl.store(OUT + second, y2, mask=mask)


@triton.jit
def _rope_kernel(Q_IN, Q_OUT, K_IN, K_OUT, COS, SIN, seq_len, half,  # type: ignore[no-untyped-def]
                 q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd, c_sb, c_st, c_sd, n_q_heads, n_k_heads,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 TRANSPOSE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    t = token % seq_len
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < half
    table = b * c_sb + t * c_st
    c1 = tl.load(COS + table + cols * c_sd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(COS + table + (cols + half) * c_sd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(SIN + table + cols * c_sd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(SIN + table + (cols + half) * c_sd, mask=cmask, other=0.0).to(tl.float32)[None, :]
    q = b * q_sb + t * q_st
    _rotate_heads(Q_IN + q, Q_OUT + q, q_sh, q_sd, n_q_heads, half, c1, c2, s1, s2, BLOCK_HQ, BLOCK_HALF, TRANSPOSE)
    k = b * k_sb + t * k_st
    _rotate_heads(K_IN + k, K_OUT + k, k_sh, k_sd, n_k_heads, half, c1, c2, s1, s2, BLOCK_HK, BLOCK_HALF, TRANSPOSE)


def _launch(q_in: Tensor, q_out: Tensor, k_in: Tensor, k_out: Tensor, cos: Tensor, sin: Tensor,
            transpose: bool) -> None:
    """Rotate q_in into q_out and k_in into k_out (each pair shares strides; in place when they are the same)."""
    b, n_q_heads, t, d = q_in.shape
    n_k_heads = k_in.shape[1]
    half = d // 2
    _rope_kernel[(b * t,)](q_in, q_out, k_in, k_out, cos, sin, t, half, *q_in.stride(), *k_in.stride(),
                           *cos.stride(), n_q_heads, n_k_heads, BLOCK_HQ=next_power_of_2(n_q_heads),
                           BLOCK_HK=next_power_of_2(n_k_heads), BLOCK_HALF=next_power_of_2(half), TRANSPOSE=transpose)


class _View(NamedTuple):
    """Where a view lies inside its base: size, strides and storage offset relative to the base's own offset."""

    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    @staticmethod
    def of(x: Tensor, base: Tensor) -> _View:
        return _View(x.size(), x.stride(), int(x.storage_offset() - base.storage_offset()))

    def on(self, t: Tensor) -> Tensor:
        """The same view taken on `t`, a tensor laid out like the base."""
        return t.as_strided(self.size, self.stride, t.storage_offset() + self.offset)


class RoPEFunction(torch.autograd.Function):
    """Rotates the q and k views inside their base tensors, in place.

    autograd refuses a Function that modifies a view input in place and returns two tensors, so this one takes the
    bases (the projection outputs, which are not views), marks them dirty, and rotates the q/k regions given by
    their `_View`s. The callers' q and k views stay valid: autograd regenerates their history from the dirty bases.
    `k_base` is None when q and k share one base (a fused QKV projection).
    """

    @staticmethod
    def forward(ctx: Any, q_base: Tensor, k_base: Tensor | None, q_view: _View, k_view: _View,
                cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        kb = q_base if k_base is None else k_base
        q, k = q_view.on(q_base), k_view.on(kb)
        _launch(q, q, k, k, cos, sin, transpose=False)
        ctx.views = (q_view, k_view)
        ctx.base_strides = (q_base.stride(), kb.stride())
        ctx.save_for_backward(cos, sin)
        if k_base is None:
            ctx.mark_dirty(q_base)
            return (q_base,)
        ctx.mark_dirty(q_base, k_base)
        return q_base, k_base

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        q_view, k_view = ctx.views
        q_strides, k_strides = ctx.base_strides
        if len(grads) == 1:  # q and k live in one base
            out = _rotate_grad(grads[0], q_strides, [q_view, k_view], cos, sin)
            return out, None, None, None, None, None
        dq_base = _rotate_grad(grads[0], q_strides, [q_view], cos, sin)
        dk_base = _rotate_grad(grads[1], k_strides, [k_view], cos, sin)
        return dq_base, dk_base, None, None, None, None


def _rotate_grad(grad: Tensor, base_strides: tuple[int, ...], views: list[_View], cos: Tensor,
                 sin: Tensor) -> Tensor:
    """The base gradient with the transposed rotation applied to the regions of `views`, in a fresh buffer.

    Both buffers are laid out like the base, so the views' strides and offsets apply to them. The incoming buffer is
    never written: autograd may hand the same tensor to another consumer (both operands of an add share it).
    """
    if grad.stride() != base_strides:  # e.g. the stride-0 gradient of a .sum()
        grad = _like_base(grad, base_strides).copy_(grad)
    out = _like_base(grad, base_strides)
    if sum(v.size.numel() for v in views) != grad.numel():
        out.copy_(grad)  # parts of the base outside q and k pass through unchanged
        grad = out
    q_view, k_view = views[0], views[-1]
    _launch(q_view.on(grad), q_view.on(out), k_view.on(grad), k_view.on(out), cos, sin, transpose=True)
    return out


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q (B, H, T, D) and k (B, KVH, T, D) in place by cos/sin (B, T, D); returns (q, k).

    Any strides work (the usual inputs are transposed views of the projection outputs). Because the rotation is in
    place, q and k must not be leaves (or views of leaves) that require grad; activations are fine.
    """
    b, _, t, d = q.shape
    if d % 2:
        raise ValueError(f"RoPE needs an even head dim, got {d}")
    cos, sin = cos.expand(b, t, d), sin.expand(b, t, d)  # a (1, T, D) table serves the whole batch
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        _launch(q, q, k, k, cos, sin, transpose=False)
        return q, k
    q_base = q if q._base is None else q._base
    k_base = k if k._base is None else k._base
    if not (is_dense(q_base) and is_dense(k_base)):
        q_base, k_base = q.clone(), k.clone()  # geometry the kernel cannot map back: rotate private copies
        q, k = q_base, k_base
    shared = q_base is k_base
    RoPEFunction.apply(q_base, None if shared else k_base, _View.of(q, q_base), _View.of(k, k_base), cos, sin)
    return q, k


def _like_base(t: Tensor, strides: tuple[int, ...]) -> Tensor:
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device)
