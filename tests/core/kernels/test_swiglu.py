"""SwiGLU: the Triton kernels against `reference.swiglu` / `reference.swiglu_backward`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from unsloth_core import kernels
from unsloth_core.kernels import reference
from unsloth_core.kernels.glu import swiglu, swiglu_backward

pytestmark = pytest.mark.usefixtures("triton_backend")
SHAPE = (7, 300)  # 2100 elements: the last block is partial


def _inputs(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    e, g, dh = (torch.randn(SHAPE, generator=gen).mul(3).to(device, dtype) for _ in range(3))
    return e, g, dh


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace_backward", [False, True])
def test_matches_reference(dtype: torch.dtype, inplace_backward: bool, device: torch.device,
                           close: Callable[..., None]) -> None:
    e0, g0, dh = _inputs(dtype, device)
    e0.requires_grad_()
    g0.requires_grad_()
    h = swiglu(e0 * 1, g0 * 1, inplace_backward=inplace_backward)  # private temporaries, as in the MLP
    got = (h, *torch.autograd.grad(h, (e0, g0), dh))
    h_ref = reference.swiglu(e0, g0)
    want = (h_ref, *torch.autograd.grad(h_ref, (e0, g0), dh))
    for a, b in zip(got, want, strict=True):
        close(a, b)


def test_dispatch_and_broadcast_grad(device: torch.device, close: Callable[..., None]) -> None:
    e, g, _ = _inputs(torch.float32, device)
    e.requires_grad_()
    got = torch.autograd.grad(kernels.swiglu(e, g).sum(), e)[0]  # sum() hands backward a stride-0 gradient
    close(got, torch.autograd.grad(reference.swiglu(e, g).sum(), e)[0])


def test_retained_graph_gives_the_same_gradients_twice(device: torch.device) -> None:
    e, g, dh = _inputs(torch.float32, device)
    e.requires_grad_()
    h = swiglu(e * 1, g * 1, inplace_backward=True)
    first = torch.autograd.grad(h, e, dh, retain_graph=True)[0]
    second = torch.autograd.grad(h, e, dh)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_kernel_writes_into_its_inputs(dtype: torch.dtype, device: torch.device,
                                                close: Callable[..., None]) -> None:
    e, g, dh = _inputs(dtype, device)
    want = reference.swiglu_backward(dh, e, g)
    swiglu_backward(dh, e, g, (dh, e, g))  # h over dh, d gate over gate, d up over up
    for got, ref in zip((dh, e, g), want, strict=True):
        close(got, ref)


def test_reference_backward_is_the_derivative(close: Callable[..., None]) -> None:
    e, g, dh = _inputs(torch.float64, torch.device("cpu"))
    e.requires_grad_()
    g.requires_grad_()
    h = reference.swiglu(e, g)
    want = (h, *torch.autograd.grad(h, (e, g), dh))
    for got, ref in zip(reference.swiglu_backward(dh, e.detach(), g.detach()), want, strict=True):
        close(got.float(), ref.detach().float())


def test_dispatched_inplace_backward(device: torch.device, close: Callable[..., None]) -> None:
    e0, g0, dh = _inputs(torch.float32, device)
    e0.requires_grad_()
    got = torch.autograd.grad(kernels.swiglu(e0 * 1, g0 * 1, inplace_backward=True), e0, dh)[0]
    close(got, torch.autograd.grad(reference.swiglu(e0, g0), e0, dh)[0])
