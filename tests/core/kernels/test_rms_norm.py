"""RMSNorm: the Triton kernel against `reference.rms_norm`, forward and backward."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from unsloth_core import kernels
from unsloth_core.kernels import reference

pytestmark = pytest.mark.usefixtures("triton_backend")
EPS = 1e-5


def _inputs(dtype: torch.dtype, weight_grad: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 25, 72, generator=gen) * 3).to(device, dtype).requires_grad_()  # 100 rows, odd width
    w = (1 + 0.5 * torch.randn(72, generator=gen)).to(device, dtype).requires_grad_(weight_grad)
    return x, w


def _run(fn: Callable[..., torch.Tensor], x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    y = fn(x, w, EPS)
    wanted = [x, w] if w.requires_grad else [x]
    return [y, *torch.autograd.grad(y, wanted, dy)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_matches_reference(dtype: torch.dtype, weight_grad: bool, device: torch.device,
                           close: Callable[..., None]) -> None:
    x, w = _inputs(dtype, weight_grad, device)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    for got, want in zip(_run(kernels.rms_norm, x, w, dy), _run(reference.rms_norm, x, w, dy), strict=True):
        close(got, want)


def test_frozen_weight_gets_no_gradient(device: torch.device) -> None:
    x, w = _inputs(torch.float32, False, device)
    kernels.rms_norm(x, w, EPS).sum().backward()
    assert w.grad is None and x.grad is not None


def test_strided_rows_and_mixed_dtypes(device: torch.device, close: Callable[..., None]) -> None:
    # Rows 80 apart holding 72 values each (a slice), bf16 activations with an fp32 weight: output promotes to fp32.
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(100, 80, generator=gen).to(device, torch.bfloat16)
    x = base[:, 3:75].requires_grad_()
    w = (1 + 0.5 * torch.randn(72, generator=gen)).to(device).requires_grad_()
    dy = torch.randn(100, 72, generator=gen).to(device)
    got, want = _run(kernels.rms_norm, x, w, dy), _run(reference.rms_norm, x, w, dy)
    assert got[0].dtype == torch.float32
    for g, r in zip(got, want, strict=True):
        close(g, r, low_precision=True)


def test_decode_shape_without_grad(device: torch.device, close: Callable[..., None]) -> None:
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 1, 16, generator=gen).to(device), torch.randn(16, generator=gen).to(device)
    with torch.inference_mode():
        close(kernels.rms_norm(x, w, EPS), reference.rms_norm(x, w, EPS))
