"""Launch settings shared by the Triton kernels (plain Python: importing this never needs triton)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

MAX_ROW_BLOCK = 65536  # one program holds a whole row in registers; Llama hidden sizes are far below this


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_block(n: int) -> int:
    """The block that covers a row of `n` elements in one program (Triton blocks are powers of two)."""
    block = next_power_of_2(n)
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"rows of {n} elements exceed the largest block this kernel supports ({MAX_ROW_BLOCK})")
    return block


def num_warps(block: int) -> int:
    """More warps for wider rows, so each thread holds a handful of elements rather than hundreds."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.cache
def program_slots(device: torch.device) -> int:
    """How many programs keep the device busy: a few per SM on CUDA, a small number under the CPU interpreter."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def as_rows(x: Tensor) -> Tensor:
    """x viewed as (rows, last dim) with unit stride along the row, copying only when no such view exists."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def is_dense(x: Tensor) -> bool:
    """Whether x's elements fill its memory exactly once (no gaps, no broadcast strides), in whatever order."""
    return torch.empty_like(x).stride() == x.stride()
