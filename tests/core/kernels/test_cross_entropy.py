"""Fused, chunked LM head + cross-entropy against `reference.linear_cross_entropy` (the full-logits version)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from unsloth_core import kernels
from unsloth_core.kernels import reference
from unsloth_core.kernels.cross_entropy import CHUNK_BYTES, chunk_rows, linear_cross_entropy

N, C, V = 50, 24, 1000


def _inputs(dtype: torch.dtype, weight_grad: bool,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, C, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=gen) * 0.5).to(device, dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::3] = kernels.IGNORE_INDEX  # a third of the tokens are masked (prompt tokens)
    return hidden, weight, labels.to(device)


def _loss_and_grads(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], hidden: torch.Tensor, weight: torch.Tensor,
                    labels: torch.Tensor) -> list[torch.Tensor]:
    loss_sum, n_tokens = fn(hidden, weight, labels)
    wanted = [hidden, weight] if weight.requires_grad else [hidden]
    # A non-unit grad_output: backward must scale the gradients computed during forward.
    grads = torch.autograd.grad(loss_sum * 3 / n_tokens, wanted)
    return [loss_sum, n_tokens, *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_matches_reference(dtype: torch.dtype, use_triton: bool, weight_grad: bool, device: torch.device,
                           close: Callable[..., None]) -> None:
    hidden, weight, labels = _inputs(dtype, weight_grad, device)

    def chunked(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy(h, w, y, chunk_size=7, use_triton=use_triton)  # 7 does not divide 34 tokens

    got = _loss_and_grads(chunked, hidden, weight, labels)
    want = _loss_and_grads(reference.linear_cross_entropy, hidden, weight, labels)
    assert got[0].dtype == torch.float32
    assert got[1].item() == want[1].item() == 33
    for a, b in zip(got, want, strict=True):
        close(a, b)


@pytest.mark.usefixtures("triton_backend")
def test_dispatch_without_grad_and_all_masked(device: torch.device, close: Callable[..., None]) -> None:
    hidden, weight, labels = _inputs(torch.float32, False, device)
    with torch.no_grad():
        close(kernels.linear_cross_entropy(hidden, weight, labels)[0],
              reference.linear_cross_entropy(hidden, weight, labels)[0])
    loss_sum, n_tokens = kernels.linear_cross_entropy(hidden, weight, torch.full_like(labels, kernels.IGNORE_INDEX))
    loss_sum.backward()
    assert loss_sum.item() == 0 and n_tokens.item() == 0
    assert hidden.grad is not None and not hidden.grad.any()


@pytest.mark.usefixtures("reference_backend")
def test_reference_backend_is_the_reference() -> None:
    hidden, weight, labels = _inputs(torch.float32, False, torch.device("cpu"))
    assert torch.equal(kernels.linear_cross_entropy(hidden, weight, labels)[0],
                       reference.linear_cross_entropy(hidden, weight, labels)[0])


def test_chunk_rows_fits_the_budget() -> None:
    cpu = torch.device("cpu")
    rows = chunk_rows(1_000_000, 128_256, torch.bfloat16, cpu)
    assert 0 < rows * 128_256 * 6 <= CHUNK_BYTES["cpu"]
    assert chunk_rows(10, 1000, torch.float32, cpu) == 10  # never more than the tokens there are
    assert chunk_rows(10, 1 << 30, torch.float32, cpu) == 1  # at least one row, whatever the vocabulary


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_counts_the_targets_ranked_first_as_the_reference(use_triton: bool, grad: bool, device: torch.device) -> None:
    """The accuracy counted from each chunk's logits (before the Triton loss overwrites them with gradients) equals
    a count from the whole logits; the loss is unchanged by counting."""
    hidden, weight, labels = _inputs(torch.float32, False, device)
    hidden.requires_grad_(grad)
    argmax = (hidden @ weight.t()).argmax(-1)
    labels[1::2] = torch.where(labels[1::2] == kernels.IGNORE_INDEX, labels[1::2], argmax[1::2])  # some right
    want = reference.count_correct(hidden.detach(), weight, labels)
    assert 0 < int(want) < int((labels != kernels.IGNORE_INDEX).sum())
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss, _ = linear_cross_entropy(hidden, weight, labels, chunk_size=7, use_triton=use_triton, correct=correct)
    assert int(correct) == int(want)
    assert torch.equal(loss, linear_cross_entropy(hidden, weight, labels, chunk_size=7, use_triton=use_triton)[0])
    if grad:
        loss.backward()
        assert hidden.grad is not None and hidden.grad.any()
