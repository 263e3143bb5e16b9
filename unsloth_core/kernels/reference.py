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


def swiglu_backward(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(h, d gate, d up) for h = silu(gate) * up given dh, in fp32 then cast, as the Triton kernel computes them.

    `h` is recomputed rather than saved: the fused LoRA MLP needs it for the down projection's adapter gradients.
    """
    e, d = gate.float(), dh.float()
    sig = torch.sigmoid(e)
    f = (e * sig).to(gate.dtype)
    h = f * up
    dg = (d * f.float()).to(up.dtype)
    de = (d * up.float() * sig * (1 + e * (1 - sig))).to(gate.dtype)
    return h, de, dg


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float,
                dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """PEFT's LoRA layer: x W^T + b + scale * (dropout(x) A^T) B^T, with W (out, in), A (r, in), B (out, r)."""
    dropped = F.dropout(x, dropout_p, training) if dropout_p > 0 else x
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(dropped, lora_a), lora_b)


# One adapted projection: (base weight (out, in), base bias (out,) or None, lora_A.weight (r, in),
# lora_B.weight (out, r)).
LoRAProj = tuple[Tensor, Tensor | None, Tensor, Tensor]


def lora_qkv(x: Tensor, q: LoRAProj, k: LoRAProj, v: LoRAProj, scale: float, dropout_p: float = 0.0,
             training: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The q, k and v projections of x, each a `lora_linear` with its own dropout draw (as PEFT's three layers)."""
    qo, ko, vo = (lora_linear(x, *proj, scale, dropout_p, training) for proj in (q, k, v))
    return qo, ko, vo


def lora_mlp(x: Tensor, gate: LoRAProj, up: LoRAProj, down: LoRAProj, scale: float, dropout_p: float = 0.0,
             training: bool = False) -> Tensor:
    """down(silu(gate(x)) * up(x)) with every projection a `lora_linear`."""
    h = swiglu(lora_linear(x, *gate, scale, dropout_p, training), lora_linear(x, *up, scale, dropout_p, training))
    return lora_linear(h, *down, scale, dropout_p, training)


@torch.no_grad()
def count_correct(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 2048,
                  ignore_index: int = IGNORE_INDEX) -> Tensor:
    """How many target tokens are the argmax of `hidden @ weight.T`, a chunk of rows at a time (bounded memory)."""
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.size(0), chunk):
        lab = labels[start:start + chunk]
        pred = (hidden[start:start + chunk] @ weight.t()).argmax(-1)
        correct += ((pred == lab) & (lab != ignore_index)).sum()
    return correct


def nf4_dequantize(packed: Tensor, absmax: Tensor, code: Tensor, numel: int, blocksize: int,
                   dtype: torch.dtype) -> Tensor:
    """The first `numel` values of 4-bit blockwise weights: code[q] * absmax[block], in fp32, then cast.

    `packed` (uint8) holds two 4-bit indices per byte, the earlier element in the high nibble (bitsandbytes'
    order); `absmax` (fp32) one scale per `blocksize` consecutive elements; `code` the 16-entry codebook.
    Each byte is looked up whole in a 256-entry table of value pairs: one gather per byte instead of a shift, a
    mask and a gather per nibble (3x faster on a CPU).
    """
    byte = torch.arange(256, device=packed.device)
    pairs = code.float()[torch.stack((byte >> 4, byte & 15), dim=-1)]  # (256, 2)
    values = pairs.index_select(0, packed.int()).view(-1, blocksize).mul_(absmax.float().unsqueeze(1))
    return values.view(-1)[:numel].to(dtype)


BUCKETED_BGMV_ROWS = 256  # up to this many rows, rows go into per-adapter buckets; beyond, grouped matmuls
BUCKET_DEPTH = 4  # ... unless an adapter has more rows than this (a prompt's prefill): every slot's bucket is as deep
_last_buckets: tuple[Tensor, tuple[Tensor, Tensor, Tensor, int]] | None = None


def _buckets(index: Tensor, n_slots: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """(rows on an adapter, their slots, their places in their slot's bucket, the fullest bucket's size). Every
    projection of a forward gets the same `index` tensor: the last one's answer is kept."""
    global _last_buckets
    last = _last_buckets  # read once: another engine's thread may replace it meanwhile
    if last is not None and last[0] is index:
        return last[1]
    live = (index >= 0).nonzero().squeeze(1)
    slots = index[live].long()
    counts = torch.bincount(slots, minlength=n_slots)
    order = torch.argsort(slots, stable=True)
    place = torch.empty_like(order)
    place[order] = torch.arange(len(slots), device=index.device) - (counts.cumsum(0) - counts)[slots[order]]
    found = (live, slots, place, int(counts.max()) if len(slots) else 0)
    _last_buckets = (index, found)
    return found


def lora_bgmv_(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scales: Tensor, index: Tensor) -> Tensor:
    """y (N, O) += scales[s] * (x (N, I) @ a[s]^T) @ b[s] for each row with adapter s = index[n] (>= 0); rows
    with index -1 are left as they are. a (S, R, I), b (S, R, O) and the products in fp32, added in y's dtype.

    A few rows (decode: one token per stream) go into one bucket per pool slot, and two batched products over the
    slots read each adapter once and compute only its rows. Grouping by adapter instead cost a gather, two products
    and a scatter per adapter present: 16 streams on 16 adapters ran at 0.16x the base's speed that way on a CPU.
    Many rows on one adapter (a prompt's prefill) group by adapter instead: every bucket would be as deep as the
    fullest, and the products then read only that adapter."""
    n_slots = a.size(0)
    if x.size(0) <= BUCKETED_BGMV_ROWS:
        live, slots, place, fullest = _buckets(index, n_slots)
        if not fullest:
            return y
        if fullest <= BUCKET_DEPTH:
            xs = x.new_zeros(n_slots, fullest, x.size(1), dtype=torch.float32)
            xs[slots, place] = x.index_select(0, live).float()
            out = torch.bmm(torch.bmm(xs, a.transpose(1, 2)) * scales[:, None, None], b)  # (S, fullest, O)
            y.index_add_(0, live, out[slots, place].to(y.dtype))
            return y
    for s in index.unique().tolist():
        if s < 0:
            continue
        if bool((index == s).all()):  # one adapter for every row: no gather
            y += ((x.float() @ a[s].t()) @ b[s] * scales[s]).to(y.dtype)
            continue
        rows = (index == s).nonzero().squeeze(1)
        delta = (x.index_select(0, rows).float() @ a[s].t()) @ b[s] * scales[s]
        y.index_add_(0, rows, delta.to(y.dtype))
    return y
