"""4-bit blockwise dequantization in Triton: each byte holds two codebook indices, each block one fp32 scale.

One program writes BLOCK output pairs: it loads BLOCK bytes, splits the nibbles, looks both up in the 16-entry
codebook (which stays in cache), scales by the block's absmax and stores the pair interleaved, in the output dtype.
The twin is `reference.nf4_dequantize`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # bytes per program: 2048 output values


@triton.jit
def _dequantize(PACKED, ABSMAX, CODE, OUT, n_bytes, blocksize,  # type: ignore[no-untyped-def]
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(PACKED + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(ABSMAX + (2 * offs) // blocksize, mask=mask, other=0.0)  # both nibbles share a block
    hi = tl.load(CODE + (byte >> 4), mask=mask, other=0.0) * scale
    lo = tl.load(CODE + (byte & 15), mask=mask, other=0.0) * scale
    tl.store(OUT + 2 * offs, hi.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + 2 * offs + 1, lo.to(OUT.dtype.element_ty), mask=mask)


def nf4_dequantize(packed: Tensor, absmax: Tensor, code: Tensor, numel: int, blocksize: int,
                   dtype: torch.dtype) -> Tensor:
    """Same contract as `reference.nf4_dequantize`; `packed`, `absmax` and `code` contiguous on one device."""
    out = torch.empty(2 * packed.numel(), dtype=dtype, device=packed.device)
    _dequantize[(triton.cdiv(packed.numel(), BLOCK),)](packed, absmax, code.float(), out, packed.numel(), blocksize,
                                                       BLOCK=BLOCK)
    return out[:numel]
