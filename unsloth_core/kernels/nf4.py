"""4-bit blockwise dequantization in Triton: each byte holds two codebook indices, each block one fp32 scale.

One program writes BLOCK output pairs: it loads BLOCK bytes, splits the nibbles, looks both up in the 16-entry
codebook (which stays in cache), scales by the block's absmax and stores the pair interleaved, in the output dtype.
The twin is `reference.nf4_dequantize`.

It is a torch custom op (`unsloth::nf4_dequantize`) with a shape rule: `NF4Tensor.dense` is a method of a tensor
subclass, which torch.compile runs on fake tensors rather than tracing into, and a bare launch would read their data
pointers (every compiled 4-bit decode failed so on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024  # bytes per program: 2048 output values


@triton.jit
def _dequantize(PACKED, ABSMAX, CODE, OUT, n_bytes, numel, blocksize,  # type: ignore[no-untyped-def]
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(PACKED + offs, mask=mask, other=0).to(tl.int32)
    scale = tl.load(ABSMAX + (2 * offs) // blocksize, mask=mask, other=0.0)  # both nibbles share a block
    hi = tl.load(CODE + (byte >> 4), mask=mask, other=0.0) * scale
    lo = tl.load(CODE + (byte & 15), mask=mask, other=0.0) * scale
    # Only the first `numel` values are written: the padding of a partial last block has no place in OUT.
    tl.store(OUT + 2 * offs, hi.to(OUT.dtype.element_ty), mask=mask & (2 * offs < numel))
    tl.store(OUT + 2 * offs + 1, lo.to(OUT.dtype.element_ty), mask=mask & (2 * offs + 1 < numel))


@torch.library.custom_op("unsloth::nf4_dequantize", mutates_args=())
def nf4_dequantize(packed: Tensor, absmax: Tensor, code: Tensor, numel: int, blocksize: int,
                   dtype: torch.dtype) -> Tensor:
    """Same contract as `reference.nf4_dequantize`; `packed`, `absmax` and `code` contiguous on one device."""
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    _dequantize[(triton.cdiv(packed.numel(), BLOCK),)](packed, absmax, code.float(), out, packed.numel(), numel,
                                                       blocksize, BLOCK=BLOCK)
    return out


@nf4_dequantize.register_fake
def _(packed: Tensor, absmax: Tensor, code: Tensor, numel: int, blocksize: int,  # noqa: ARG001 (the op's signature)
      dtype: torch.dtype) -> Tensor:
    return packed.new_empty(numel, dtype=dtype)
