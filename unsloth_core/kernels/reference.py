"""Plain-torch twins of every fused kernel: the definition of what each kernel computes.

These run everywhere (CPU, any GPU) and are what the Triton kernels are tested against. Each one matches the
numerics of HF transformers' Llama (fp32 statistics in RMSNorm, RoPE tables computed in fp32, fp32 loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """y = w * x / sqrt(mean(x^2) + eps), the statistic in fp32 and the product in x's dtype (as HF does)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate q (B, H, T, D) and k (B, KVH, T, D) by the tables cos/sin (B, T, D), HF's half-split layout."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Sum of token losses of `hidden @ weight.T` against `labels` (already shifted), in fp32.

    Returns (loss_sum, n_target_tokens); the caller divides, so that gradient accumulation can normalise by the
    number of target tokens in the whole accumulation window rather than per micro batch.
    """
    logits = (hidden @ weight.t()).float()
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.reshape(-1), ignore_index=ignore_index,
                           reduction="sum")
    return loss, (labels != ignore_index).sum()
