"""Batched LoRA (each row on its own adapter): the Triton kernels against `reference.lora_bgmv_`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from unsloth_core import kernels
from unsloth_core.kernels import reference
from unsloth_core.kernels.bgmv import lora_bgmv_

pytestmark = pytest.mark.usefixtures("triton_backend")


def pool(device: torch.device, n_in: int = 96, n_out: int = 200, ranks: tuple[int, ...] = (8, 4, 8)
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three adapters stacked as the pool keeps them: rank padded to the largest with zeros (adapter 1 has 4)."""
    g = torch.Generator().manual_seed(0)
    rank = max(ranks)
    a, b = torch.zeros(len(ranks), rank, n_in), torch.zeros(len(ranks), rank, n_out)  # b: B transposed
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, n_in, generator=g) / n_in**0.5
        b[s, :r] = torch.randn(r, n_out, generator=g)
    return a.to(device), b.to(device), torch.tensor([2.0, 0.5, 1.0], device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_gets_its_own_adapter(dtype: torch.dtype, device: torch.device, close: Callable[..., None]) -> None:
    a, b, scales = pool(device)
    index = torch.tensor([2, -1, 0, 1, 2, 0, -1], device=device)  # repeats, base rows, every adapter
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    y = torch.randn(7, 200, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    want = reference.lora_bgmv_(y.clone(), x, a, b, scales, index)
    got = lora_bgmv_(y.clone(), x, a, b, scales, index)
    close(got, want)
    assert torch.equal(got[1], y[1]) and torch.equal(got[6], y[6])  # the base rows are untouched
    # Row 3 alone, as a LoRA layer computes it: scale * B (A x) in fp32, added in y's dtype.
    alone = y[3].float() + 0.5 * ((a[1] @ x[3].float()) @ b[1])
    close(got[3], alone.to(dtype))


def test_the_dispatch_and_a_non_contiguous_output(device: torch.device) -> None:
    a, b, scales = pool(device)
    index = torch.tensor([0, 1], device=device)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(3)).to(device)
    y = torch.zeros(200, 2, device=device).t()  # a transposed view: updated in place all the same
    kernels.lora_bgmv_(y, x, a, b, scales, index)
    want = reference.lora_bgmv_(torch.zeros(2, 200, device=device), x, a, b, scales, index)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_the_twins_bucketed_and_grouped_forms_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The twin's two forms (per-slot buckets and batched products for a few rows, grouped by adapter for many)."""
    a, b, scales = pool(torch.device("cpu"))
    index = torch.tensor([2, -1, 0, 1, 2, 0, -1, 1, 1])
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(4))
    bucketed = reference.lora_bgmv_(torch.zeros(9, 200), x, a, b, scales, index)
    assert reference.lora_bgmv_(torch.zeros(9, 200), x, a, b, scales, index.clone()).equal(bucketed)  # not cached
    monkeypatch.setattr(reference, "BUCKETED_BGMV_ROWS", 0)
    grouped = reference.lora_bgmv_(torch.zeros(9, 200), x, a, b, scales, index)
    torch.testing.assert_close(bucketed, grouped, rtol=1e-5, atol=1e-5)  # fp32 sums of O(1) terms, another order
    one = torch.full((9,), 1)  # every row on one adapter: no gather
    torch.testing.assert_close(reference.lora_bgmv_(torch.zeros(9, 200), x, a, b, scales, one),
                               0.5 * (x @ a[1].t()) @ b[1], rtol=1e-5, atol=1e-6)
