"""Which implementation each fused op runs: the Triton kernels or the plain-torch reference.

`auto` (the default) runs Triton on CUDA tensors and the reference elsewhere; `triton` forces the Triton kernels
(on CPU tensors that needs `TRITON_INTERPRET=1`, which is how the tests run them); `reference` forces plain torch.
The environment variable `UNSLOTH_KERNELS` sets the starting choice, `set_backend()` changes it from code.
"""

from __future__ import annotations

import os
from typing import Literal

from torch import Tensor

Backend = Literal["auto", "triton", "reference"]
BACKENDS: tuple[Backend, ...] = ("auto", "triton", "reference")

# Ops whose Triton kernel `auto` picks on a GPU. An op leaves this set until a benchmark shows its kernel beating
# the torch path on the GPU it runs on; forcing `triton` still runs it (that is how tests keep it correct).
# On an H200 (2026-12-04, bench/RESULTS.md; `python -m bench --gpu --check --only kernels`, Llama-8B shapes, fwd+bwd
# where there is one) each kernel beat its twin: rms_norm 1.95x, rope 1.48x, swiglu 1.19x, cross_entropy 1.57x,
# nf4_dequantize 6.5x (14336x4096 to bf16). Two later runs that evening: rms_norm 3.42x / 1.56x, swiglu 1.38x
# both, cross_entropy 1.57x / 1.58x, nf4 5.41x / 5.47x; rope 0.84x / 1.03x (its twin is two fused elementwise
# kernels; it stays, two runs of three ahead, and is the one to watch). lora_bgmv (kernels/bgmv.py, several
# adapters in one serving batch: 32 rows on 16 rank-16 adapters, 4096->4096) 2.24x its twin, passing its CUDA tests.
AUTO_TRITON_OPS: frozenset[str] = frozenset({"rms_norm", "rope", "swiglu", "cross_entropy", "nf4_dequantize",
                                             "lora_bgmv"})


def _check(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


_backend: Backend = _check(os.environ.get("UNSLOTH_KERNELS", "auto").strip().lower() or "auto")


def set_backend(name: str) -> None:
    """Force `triton` or `reference` for every op, or return to `auto` (Triton on CUDA, reference elsewhere)."""
    global _backend
    _backend = _check(name)


def get_backend() -> Backend:
    return _backend


def use_triton(op: str, x: Tensor) -> bool:
    """Whether `op` on tensor `x` runs its Triton kernel under the current backend."""
    if _backend == "reference":
        return False
    if _backend == "triton":
        return True
    return x.is_cuda and op in AUTO_TRITON_OPS


_fused_lora = os.environ.get("UNSLOTH_FUSED_LORA", "1").strip().lower() not in ("0", "false", "no", "off")


def set_fused_lora(enabled: bool) -> None:
    """Use the hand-written LoRA autograd Functions (QKV, MLP) in training, or PEFT-style per-layer autograd."""
    global _fused_lora
    _fused_lora = enabled


def fused_lora_enabled() -> bool:
    return _fused_lora
