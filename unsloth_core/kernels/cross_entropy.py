"""The LM head and cross-entropy fused and chunked over tokens, so the full (N, V) logits never exist.

Forward walks the tokens in chunks sized from a memory budget. For each chunk it computes the logits, their loss,
and at once the gradient of the summed loss w.r.t. the chunk's hidden states (and adds the chunk's share of dW
when the head trains); the chunk's logits are then dropped. Backward only scales those gradients by grad_output.
Tokens labelled `ignore_index` are dropped before any matmul: with prompt masking that skips real work.

Plain torch matmuls, so it saves memory on the CPU too; on a GPU the per-chunk softmax/loss/gradient runs as one
Triton kernel over the logits in place (`cross_entropy_rows.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from unsloth_core.kernels.reference import IGNORE_INDEX

# Bytes one chunk's logits may take: large enough that the matmuls stay efficient, small next to the activations.
# Logits bytes per chunk. On the CPU 256 MiB (about 1.3k rows of a 49k vocabulary) keeps the head's GEMM efficient
# (64 MiB, 128-row chunks, ran it at ~20% below a whole-batch GEMM) while still never holding the whole logits.
CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}


def chunk_rows(n_rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per chunk: the chunk's logits in `dtype` plus the fp32 copy the torch path makes fit the budget."""
    per_row = vocab * (dtype.itemsize + 4)
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    rows = max(1, budget // per_row)
    if rows >= 128:
        rows -= rows % 64  # matmul-friendly
    return max(1, min(n_rows, rows))


def _rows_torch(logits: Tensor, labels: Tensor, ignore_index: int, write_grad: bool) -> tuple[Tensor, Tensor]:
    """(per-row losses in fp32, d loss_sum / d logits in the logits' dtype, or logits untouched)."""
    z = logits.float()  # our own chunk buffer: in-place work on it is safe
    lse = torch.logsumexp(z, dim=-1)
    valid = labels != ignore_index
    target = labels.masked_fill(~valid, 0)
    loss = torch.where(valid, lse - z.gather(1, target[:, None]).squeeze(1), 0.0)
    if not write_grad:
        return loss, logits
    grad = z.sub_(lse[:, None]).exp_()  # softmax
    grad.scatter_add_(1, target[:, None], -valid[:, None].to(grad.dtype))  # minus the one-hot target
    grad.mul_(valid[:, None])
    return loss, grad.to(logits.dtype)


def _chunk_loss(logits: Tensor, labels: Tensor, ignore_index: int, write_grad: bool,
                use_triton: bool) -> tuple[Tensor, Tensor]:
    if use_triton:
        from unsloth_core.kernels.cross_entropy_rows import cross_entropy_rows

        return cross_entropy_rows(logits, labels, ignore_index, write_grad), logits
    return _rows_torch(logits, labels, ignore_index, write_grad)


def _add_matmul(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b with acc in fp32 (CPU matmuls cannot write fp32 from bf16 inputs, so cast the product)."""
    if acc.dtype == a.dtype == b.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b.to(a.dtype))


def _matmul_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b. `out=` takes no mixed dtypes (and autocast does not apply to it): under bf16 autocast a trained
    fp32 head gives bf16 logits, and a trained fp32 embedding an fp32 residual stream."""
    if out.dtype == a.dtype == b.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _chunked(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int, chunk: int | None, need_dh: bool,
             need_dw: bool, use_triton: bool, count_correct: bool = False
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss_sum, n_tokens, targets ranked first or None, d loss_sum/d hidden or None, d loss_sum/d weight in fp32
    or None), chunk by chunk. Counting the targets ranked first reads each chunk's logits once more while they
    exist, where a separate count would redo the head's matmul."""
    valid = labels != ignore_index
    n_tokens = valid.sum()
    rows = valid.nonzero().squeeze(1)  # one host sync, repaid by skipping the masked tokens' matmuls
    kept_all = rows.numel() == labels.numel()
    h = (hidden if kept_all else hidden.index_select(0, rows)).contiguous()
    y = labels if kept_all else labels.index_select(0, rows)
    step = chunk or chunk_rows(h.shape[0], weight.shape[0], h.dtype, h.device)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device) if count_correct else None
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    w_grad: Tensor | None = None  # the weight in the logits' dtype, cast once
    for start in range(0, h.shape[0], step):
        h_c, y_c = h[start:start + step], y[start:start + step]
        logits = h_c @ weight.t()
        if correct is not None:  # before the loss kernel, which may write the gradient over the logits
            correct += (logits.argmax(-1) == y_c).sum()
        row_loss, grad = _chunk_loss(logits, y_c, ignore_index, need_dh or need_dw, use_triton)
        loss += row_loss.sum()
        if dh is not None:
            w_grad = weight.to(grad.dtype) if w_grad is None else w_grad
            _matmul_into(dh[start:start + step], grad, w_grad)
        if dw is not None:
            _add_matmul(dw, grad.t(), h_c)
    if dh is not None and not kept_all:
        dh = torch.zeros_like(hidden).index_copy_(0, rows, dh)  # masked tokens get no gradient
    return loss, n_tokens, correct, dh, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int,
                chunk: int | None, use_triton: bool, count_correct: bool) -> tuple[Tensor, Tensor, Tensor]:
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, n_tokens, correct, dh, dw = _chunked(hidden, weight, labels, ignore_index, chunk, need_dh, need_dw,
                                                   use_triton, count_correct)
        correct = correct if correct is not None else torch.zeros((), dtype=torch.long, device=hidden.device)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(n_tokens, correct)
        return loss, n_tokens, correct

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, d_loss: Tensor, _d_tokens: Tensor | None, _d_correct: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
        # The gradients were computed in forward for a loss_sum weight of 1; the chain rule only scales them.
        dh, dw = ctx.saved_tensors
        d_hidden = dh * d_loss.to(dh.dtype) if dh is not None else None
        d_weight = (dw * d_loss).to(ctx.weight_dtype) if dw is not None else None
        return d_hidden, d_weight, None, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, *,
                         chunk_size: int | None = None, use_triton: bool = False,
                         correct: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum of token losses in fp32, number of target tokens) of `hidden` (N, C) @ `weight` (V, C)^T vs `labels` (N,).

    Same contract as `reference.linear_cross_entropy`. `chunk_size` overrides the tokens per chunk (default: from
    the memory budget); `use_triton` runs each chunk's softmax and loss as the Triton kernel. `correct`, a 0-dim
    integer tensor, gets the number of targets the logits rank first added to it.
    """
    count = correct is not None
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss, n_tokens, n_correct = LinearCrossEntropyFunction.apply(
            hidden, weight, labels, ignore_index, chunk_size, use_triton, count)
    else:
        loss, n_tokens, n_correct, _, _ = _chunked(hidden, weight, labels, ignore_index, chunk_size, False, False,
                                                   use_triton, count)
    if correct is not None and n_correct is not None:
        correct += n_correct
    return loss, n_tokens
