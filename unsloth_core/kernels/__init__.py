"""Fused ops, dispatched by device: Triton kernels on a CUDA GPU, the plain-torch reference elsewhere.

`UNSLOTH_KERNELS=reference` forces the reference everywhere, `UNSLOTH_KERNELS=triton` forces Triton (with
`TRITON_INTERPRET=1` that runs Triton kernels on the CPU, which is how CI tests them). `set_backend()` does the
same from code.

One file per op: `norm.py` (RMSNorm), `rotary.py` (RoPE), `glu.py` (SwiGLU), `cross_entropy.py` (LM head + loss,
chunked), `lora.py` (LoRA projections with a hand-written backward), `offload.py` (checkpointing with the layer
input offloaded), `nf4.py` (4-bit weight dequantization, dispatched from unsloth_core/quant.py), `bgmv.py` (each
row of a serving batch on its own LoRA adapter). The Triton files are imported on first use only, so importing this
package never needs triton. Their names differ from the functions
here on purpose: importing a submodule binds its name on the package, and a `kernels/rms_norm.py` would replace
`kernels.rms_norm` the function with the module.
"""

from __future__ import annotations

from torch import Tensor

from unsloth_core.kernels import reference
from unsloth_core.kernels.backend import fused_lora_enabled, get_backend, set_backend, set_fused_lora, use_triton
from unsloth_core.kernels.lora import lora_linear, lora_mlp, lora_qkv
from unsloth_core.kernels.offload import checkpoint
from unsloth_core.kernels.reference import IGNORE_INDEX, LoRAProj

__all__ = [
    "IGNORE_INDEX",
    "LoRAProj",
    "checkpoint",
    "fused_lora_enabled",
    "get_backend",
    "linear_cross_entropy",
    "lora_bgmv_",
    "lora_linear",
    "lora_mlp",
    "lora_qkv",
    "reference",
    "rms_norm",
    "rope",
    "set_backend",
    "set_fused_lora",
    "swiglu",
]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, statistics in fp32 (HF's numerics)."""
    if use_triton("rms_norm", x):
        from unsloth_core.kernels.norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q (B, H, T, D) and k (B, KVH, T, D) rotated by the per-token tables cos/sin (B, T, D), HF half-split layout.

    Use the returned tensors: the Triton path rotates q and k in place, the reference returns new ones.
    """
    if use_triton("rope", q):
        from unsloth_core.kernels.rotary import rope as triton_rope

        return triton_rope(q, k, cos, sin)
    return reference.rope(q, k, cos, sin)


def swiglu(gate: Tensor, up: Tensor, *, inplace_backward: bool = False) -> Tensor:
    """silu(gate) * up, silu in fp32 then cast to the input dtype (as HF).

    `inplace_backward=True` (Triton path) writes the gradients into gate's and up's buffers: pass it only when
    they are private temporaries, like an MLP's projection outputs (see `glu.swiglu`).
    """
    if use_triton("swiglu", gate):
        from unsloth_core.kernels.glu import swiglu as triton_swiglu

        return triton_swiglu(gate, up, inplace_backward=inplace_backward)
    return reference.swiglu(gate, up)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX,
                         correct: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum of token losses in fp32, number of target tokens) of hidden (N, C) @ weight (V, C)^T vs labels (N,);
    `correct` (a 0-dim integer tensor), when given, gets the number of targets the logits rank first added to it.

    Chunked so the (N, V) logits never exist, on every device; the `reference` backend computes them whole.
    """
    if get_backend() == "reference":
        if correct is not None:
            correct += reference.count_correct(hidden.detach(), weight.detach(), labels, ignore_index=ignore_index)
        return reference.linear_cross_entropy(hidden, weight, labels, ignore_index)
    from unsloth_core.kernels.cross_entropy import linear_cross_entropy as chunked

    return chunked(hidden, weight, labels, ignore_index, use_triton=use_triton("cross_entropy", hidden),
                   correct=correct)


def lora_bgmv_(y: Tensor, x: Tensor, a: Tensor, b: Tensor, scales: Tensor, index: Tensor) -> Tensor:
    """y (N, O) += each row's own adapter's update: scales[s] * (x[n] @ a[s]^T) @ b[s] for s = index[n] >= 0 (rows
    with -1 unchanged). a (S, R, I) and b (S, R, O) (B transposed) are the pool's stacked adapters, ranks
    zero-padded to R."""
    if use_triton("lora_bgmv", x):
        from unsloth_core.kernels.bgmv import lora_bgmv_ as triton_lora_bgmv_

        return triton_lora_bgmv_(y, x, a, b, scales, index)
    return reference.lora_bgmv_(y, x, a, b, scales, index)
