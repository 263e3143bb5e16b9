"""Triton kernel for one chunk of the fused LM-head loss: per-row loss, and the logits gradient written in place.

One program per row makes two passes over the vocabulary: an online max/sum-of-exponentials for logsumexp, then
(when a gradient is wanted) softmax minus the one-hot target, stored over the logits in their own dtype. The
torch path needs an fp32 copy of the chunk and several passes; this reads the bf16 logits twice and writes once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_V = 4096


@triton.jit
def _cross_entropy_rows(LOGITS, LABELS, LOSS, stride_row, vocab, ignore_index,  # type: ignore[no-untyped-def]
                        BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        for start in range(0, vocab, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < vocab
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            grad = tl.where(cols == label, p - 1.0, p)
            tl.store(base + cols, tl.where(valid, grad, 0.0), mask=mask)


def cross_entropy_rows(logits: Tensor, labels: Tensor, ignore_index: int, write_grad: bool) -> Tensor:
    """Per-row losses (fp32, 0 where ignored) of `logits` (n, V).

    With `write_grad`, `logits` is overwritten by d loss_sum / d logits (softmax minus one-hot; 0 on ignored rows).
    """
    n, vocab = logits.shape
    assert logits.stride(1) == 1, "rows must be contiguous"
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    _cross_entropy_rows[(n,)](logits, labels, loss, logits.stride(0), vocab, ignore_index,
                              BLOCK_V=min(BLOCK_V, triton.next_power_of_2(vocab)), WRITE_GRAD=write_grad,
                              num_warps=8)
    return loss
