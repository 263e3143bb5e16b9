"""Fused LoRA Functions against autograd through the naive formula (PEFT's), with the very same dropout masks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from unsloth_core import kernels
from unsloth_core.kernels import reference
from unsloth_core.kernels.lora import draw_seed, keep_mask

C, INTER, R, SCALE = 24, 40, 4, 2.0
Proj = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]


def _proj(n_in: int, n_out: int, bias: bool, dtype: torch.dtype, gen: torch.Generator,
          device: torch.device) -> Proj:
    """Frozen W (and b), trainable A and B; B is non-zero so every gradient path carries signal."""
    w = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
    b = torch.randn(n_out, generator=gen) if bias else None
    a = torch.randn(R, n_in, generator=gen) / n_in**0.5
    bb = torch.randn(n_out, R, generator=gen) / R**0.5
    return (w.to(device, dtype), None if b is None else b.to(device, dtype), a.to(device, dtype).requires_grad_(),
            bb.to(device, dtype).requires_grad_())


def _mlp_projs(bias: bool, dtype: torch.dtype, gen: torch.Generator, device: torch.device) -> list[Proj]:
    """gate (C -> INTER), up (C -> INTER), down (INTER -> C)."""
    return [_proj(C, INTER, bias, dtype, gen, device), _proj(C, INTER, bias, dtype, gen, device),
            _proj(INTER, C, bias, dtype, gen, device)]


def _x(*shape: int, dtype: torch.dtype, gen: torch.Generator, device: torch.device, grad: bool) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(grad)


def _naive(x: torch.Tensor, proj: Proj, p: float, seed: int | None, index: int) -> torch.Tensor:
    w, b, a, bb = proj
    dropped = x if seed is None else x * keep_mask(x, p, seed, index) * (1 / (1 - p))
    return F.linear(x, w, b) + SCALE * F.linear(F.linear(dropped, a), bb)


def _compare(fused: Callable[[], object], naive: Callable[[int | None], object], x: torch.Tensor,
             projs: list[Proj], p: float, close: Callable[..., None]) -> None:
    """Run both with the same seed; compare outputs and the gradients of x (if it trains), every A and B."""
    torch.manual_seed(1234)
    got = fused()
    torch.manual_seed(1234)
    seed = draw_seed() if p > 0 else None  # the seed the fused call drew
    want = naive(seed)
    got_t = list(got) if isinstance(got, tuple) else [got]
    want_t = list(want) if isinstance(want, tuple) else [want]
    params = ([x] if x.requires_grad else []) + [t for proj in projs for t in proj[2:]]
    gen = torch.Generator().manual_seed(5)
    grads_out = [torch.randn(t.shape, generator=gen).to(t.device, t.dtype) for t in got_t]
    for a, b in zip(got_t, want_t, strict=True):
        close(a, b)
    for a, b in zip(torch.autograd.grad(got_t, params, grads_out), torch.autograd.grad(want_t, params, grads_out),
                    strict=True):
        close(a, b)


CASES = [  # dtype, dropout p, biases, x requires grad
    (torch.float32, 0.0, False, True),
    (torch.float32, 0.3, True, True),
    (torch.float32, 0.3, True, False),
    (torch.bfloat16, 0.0, True, True),
    (torch.bfloat16, 0.3, False, True),
]


@pytest.mark.parametrize(("dtype", "p", "bias", "x_grad"), CASES)
def test_lora_linear(dtype: torch.dtype, p: float, bias: bool, x_grad: bool, device: torch.device,
                     close: Callable[..., None]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = _x(2, 9, C, dtype=dtype, gen=gen, device=device, grad=x_grad)
    proj = _proj(C, INTER, bias, dtype, gen, device)
    _compare(lambda: kernels.lora_linear(x, *proj, SCALE, p, True),
             lambda seed: _naive(x, proj, p, seed, 0), x, [proj], p, close)


@pytest.mark.parametrize(("dtype", "p", "bias", "x_grad"), CASES)
def test_lora_qkv(dtype: torch.dtype, p: float, bias: bool, x_grad: bool, device: torch.device,
                  close: Callable[..., None]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = _x(2, 9, C, dtype=dtype, gen=gen, device=device, grad=x_grad)
    projs = [_proj(C, n, bias, dtype, gen, device) for n in (32, 16, 16)]  # GQA: k and v narrower than q
    _compare(lambda: kernels.lora_qkv(x, *projs, SCALE, p, True),
             lambda seed: tuple(_naive(x, proj, p, seed, i) for i, proj in enumerate(projs)), x, projs, p, close)


@pytest.mark.parametrize("backend", ["triton", "reference"])  # the SwiGLU inside: Triton kernel or torch twin
@pytest.mark.parametrize(("dtype", "p", "bias", "x_grad"), CASES)
def test_lora_mlp(backend: str, dtype: torch.dtype, p: float, bias: bool, x_grad: bool, device: torch.device,
                  close: Callable[..., None]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = _x(2, 9, C, dtype=dtype, gen=gen, device=device, grad=x_grad)
    projs = _mlp_projs(bias, dtype, gen, device)

    def naive(seed: int | None) -> torch.Tensor:
        h = reference.swiglu(_naive(x, projs[0], p, seed, 0), _naive(x, projs[1], p, seed, 1))
        return _naive(h, projs[2], p, seed, 2)

    previous = kernels.get_backend()
    kernels.set_backend(backend)
    try:
        _compare(lambda: kernels.lora_mlp(x, *projs, SCALE, p, True), naive, x, projs, p, close)
    finally:
        kernels.set_backend(previous)


def test_eval_mode_skips_dropout_and_matches_the_reference(device: torch.device, close: Callable[..., None]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = _x(5, C, dtype=torch.float32, gen=gen, device=device, grad=False)
    proj = _proj(C, INTER, True, torch.float32, gen, device)
    close(kernels.lora_linear(x, *proj, SCALE, 0.5, False), reference.lora_linear(x, *proj, SCALE, 0.5, False))
    projs = _mlp_projs(True, torch.float32, gen, device)
    close(kernels.lora_mlp(x, *projs, SCALE, 0.5, False), reference.lora_mlp(x, *projs, SCALE, 0.5, False))


def test_trainable_base_weight_and_bias_get_gradients(device: torch.device, close: Callable[..., None]) -> None:
    gen = torch.Generator().manual_seed(0)
    x = _x(5, C, dtype=torch.float32, gen=gen, device=device, grad=False)
    w, b, a, bb = _proj(C, INTER, True, torch.float32, gen, device)
    assert b is not None
    w.requires_grad_()
    b.requires_grad_()
    got = torch.autograd.grad(kernels.lora_linear(x, w, b, a, bb, SCALE).sum(), (w, b))
    want = torch.autograd.grad(reference.lora_linear(x, w, b, a, bb, SCALE).sum(), (w, b))
    for g, r in zip(got, want, strict=True):
        close(g, r)


@pytest.mark.usefixtures("triton_backend")
def test_mlp_retained_graph_gives_the_same_gradients_twice(device: torch.device) -> None:
    # Backward overwrites its saved gate/up buffers, except when the graph is retained for another backward.
    gen = torch.Generator().manual_seed(0)
    x = _x(5, C, dtype=torch.float32, gen=gen, device=device, grad=False)
    projs = _mlp_projs(False, torch.float32, gen, device)
    y = kernels.lora_mlp(x, *projs, SCALE)
    first = torch.autograd.grad(y.sum(), projs[0][2], retain_graph=True)[0]
    second = torch.autograd.grad(y.sum(), projs[0][2])[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
