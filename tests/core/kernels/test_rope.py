"""RoPE: the in-place Triton kernel against `reference.rope`, on the strided views the model passes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from unsloth_core import kernels
from unsloth_core.kernels import reference
from unsloth_core.kernels.rotary import _rotate_grad, _View

pytestmark = pytest.mark.usefixtures("triton_backend")
B, T, H, KVH = 2, 6, 4, 2
# Row 0 packs two samples (positions restart at 0), row 1 is one sample starting mid-stream.
POSITIONS = [[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]]
Rope = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def tables(d: int, dtype: torch.dtype, device: torch.device,
           positions: list[list[int]] = POSITIONS) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.tensor(positions)[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device, dtype), emb.sin().to(device, dtype)


def randn(*shape: int, seed: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def rotate(fn: Rope, xq: torch.Tensor, xk: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xq, xk stand for the q_proj / k_proj outputs (B, T, heads * D); rotate them as model.py views them."""
    d = cos.shape[-1]
    q = (xq * 1).view(B, T, H, d).transpose(1, 2)  # non-leaf, strided (B, H, T, D)
    k = (xk * 1).view(B, T, KVH, d).transpose(1, 2)
    return fn(q, k, cos, sin)


@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(d: int, dtype: torch.dtype, device: torch.device, close: Callable[..., None]) -> None:
    xq = randn(B, T, H * d, seed=0, device=device, dtype=dtype).requires_grad_()
    xk = randn(B, T, KVH * d, seed=1, device=device, dtype=dtype).requires_grad_()
    cos, sin = tables(d, dtype, device)
    gq, gk = randn(B, H, T, d, seed=2, device=device, dtype=dtype), randn(B, KVH, T, d, seed=3, device=device,
                                                                          dtype=dtype)
    results = []
    for fn in (kernels.rope, reference.rope):
        q, k = rotate(fn, xq, xk, cos, sin)
        grads = torch.autograd.grad((q * gq).sum() + (k * gk).sum(), (xq, xk))
        results.append((q, k, *grads))
    for got, want in zip(*results, strict=True):
        close(got, want)


@pytest.mark.parametrize("grad", [False, True])
def test_rotates_in_place(grad: bool, device: torch.device, close: Callable[..., None]) -> None:
    cos, sin = tables(16, torch.float32, device)
    src_q = randn(B, T, H * 16, seed=0, device=device).requires_grad_(grad)
    src_k = randn(B, T, KVH * 16, seed=1, device=device).requires_grad_(grad)
    q = (src_q * 1).view(B, T, H, 16).transpose(1, 2)
    k = (src_k * 1).view(B, T, KVH, 16).transpose(1, 2)
    want_q, want_k = reference.rope(q.detach(), k.detach(), cos, sin)
    got_q, got_k = kernels.rope(q, k, cos, sin)
    assert got_q is q and got_k is k
    close(q.detach(), want_q)
    close(k.detach(), want_k)
    assert q.requires_grad is grad


def test_position_reset_equals_a_separate_sequence(device: torch.device, close: Callable[..., None]) -> None:
    # The second packed sample of row 0 (positions 0, 1, 2 at slots 3..5) rotates exactly like a sample of its own.
    cos, sin = tables(16, torch.float32, device)
    xq, xk = randn(B, T, H * 16, seed=0, device=device), randn(B, T, KVH * 16, seed=1, device=device)
    order = [3, 4, 5, 0, 1, 2]
    q, _ = rotate(kernels.rope, xq, xk, cos, sin)
    q_alone, _ = rotate(kernels.rope, xq[:, order], xk[:, order], cos, sin)
    close(q[0, :, 3:], q_alone[0, :, :3])


def test_shared_base_and_broadcast_table(device: torch.device, close: Callable[..., None]) -> None:
    # One fused QKV output holds q, k and v; a (1, T, D) table serves the whole batch; sum() gives broadcast grads.
    d = 16
    fused = randn(B, T, (H + 2 * KVH) * d, seed=3, device=device).requires_grad_()
    cos, sin = tables(d, torch.float32, device, POSITIONS[1:])
    results = []
    for fn in (kernels.rope, reference.rope):
        qkv = fused * 1
        q = qkv[..., : H * d].view(B, T, H, d).transpose(1, 2)
        k = qkv[..., H * d: (H + KVH) * d].view(B, T, KVH, d).transpose(1, 2)
        v = qkv[..., (H + KVH) * d:]
        q, k = fn(q, k, cos, sin)
        (grad,) = torch.autograd.grad(q.sum() + (k * k).sum() + (v * 3).sum(), fused)
        results.append((q, k, grad))
    for got, want in zip(*results, strict=True):
        close(got, want)


def test_base_in_another_layout(device: torch.device, close: Callable[..., None]) -> None:
    # The projection outputs are dense but T-major rather than row-major.
    d = 16
    src_q = randn(B, H * d, T, seed=4, device=device).requires_grad_()
    src_k = randn(B, KVH * d, T, seed=5, device=device).requires_grad_()
    cos, sin = tables(d, torch.float32, device)
    weights = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    results = []
    for fn in (kernels.rope, reference.rope):
        q = (src_q * 1).transpose(1, 2).unflatten(-1, (H, d)).transpose(1, 2)
        k = (src_k * 1).transpose(1, 2).unflatten(-1, (KVH, d)).transpose(1, 2)
        q, k = fn(q, k, cos, sin)
        grads = torch.autograd.grad((q * weights).sum() + k.square().sum(), (src_q, src_k))
        results.append((q, k, *grads))
    for got, want in zip(*results, strict=True):
        close(got, want)


def test_gradient_in_a_foreign_layout_is_relaid_like_the_base(device: torch.device) -> None:
    d = 16
    base = torch.empty(B, T, (H + KVH) * d, device=device)  # a fused q|k projection output
    q_view = _View.of(base[..., : H * d].view(B, T, H, d).transpose(1, 2), base)
    k_view = _View.of(base[..., H * d:].view(B, T, KVH, d).transpose(1, 2), base)
    cos, sin = tables(d, torch.float32, device)
    grad = randn(B, (H + KVH) * d, T, seed=6, device=device).transpose(1, 2)  # T-major
    got = _rotate_grad(grad, base.stride(), [q_view, k_view], cos, sin)
    want = _rotate_grad(grad.contiguous(), base.stride(), [q_view, k_view], cos, sin)
    assert got.stride() == base.stride()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
