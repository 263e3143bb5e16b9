"""Kernel tests: each Triton kernel against its plain-torch twin, run on the CPU through Triton's interpreter."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from unsloth_core import kernels

Close = Callable[..., None]


@pytest.fixture
def device() -> torch.device:
    """Where the tensors live: the GPU when there is one (Triton compiled), else the CPU (Triton interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_backend() -> Iterator[None]:
    """Force the Triton kernels (interpreted on CPU tensors) for the duration of a test."""
    previous = kernels.get_backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(previous)


@pytest.fixture
def reference_backend() -> Iterator[None]:
    previous = kernels.get_backend()
    kernels.set_backend("reference")
    yield
    kernels.set_backend(previous)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, low_precision: bool | None = None) -> None:
    """fp32: tight. bf16 (or fp32 computed from bf16 values): within 2% of the tensor's scale.

    2% is a few bf16 ulps: the interpreter truncates fp32 -> bf16 where a GPU rounds, and the kernels round once in
    fp32 where eager torch rounds after every op.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape,
                                                                                actual.dtype, expected.dtype)
    if low_precision is None:
        low_precision = expected.dtype != torch.float32
    if not low_precision:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, expected.abs().max().item()))
    else:
        scale = expected.float().abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=2e-2 * max(scale, 1e-3))


@pytest.fixture
def close() -> Close:
    return assert_close
