"""Fused ops, dispatched by device: Triton kernels on a CUDA GPU, the plain-torch reference elsewhere.

`UNSLOTH_KERNELS=reference` forces the reference everywhere, `UNSLOTH_KERNELS=triton` forces Triton (with
`TRITON_INTERPRET=1` that runs Triton kernels on the CPU, which is how CI tests them). `set_backend()` does the
same from code.
"""

from __future__ import annotations

from unsloth_core.kernels import reference
from unsloth_core.kernels.reference import IGNORE_INDEX, linear_cross_entropy, rms_norm, rope, swiglu

__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "reference", "rms_norm", "rope", "swiglu"]
