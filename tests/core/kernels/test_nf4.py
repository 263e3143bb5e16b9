"""4-bit dequantization: the Triton kernel against `reference.nf4_dequantize`."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from unsloth_core.kernels import reference
from unsloth_core.kernels.nf4 import nf4_dequantize
from unsloth_core.quant import NF4Tensor, nf4_code

pytestmark = pytest.mark.usefixtures("triton_backend")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 64), (7, 300), (3, 2049)])  # whole blocks, a partial last block, > one program
def test_matches_reference(shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                           close: Callable[..., None]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).mul(0.05).to(device)
    q = NF4Tensor.from_dense(w)
    args = (q.packed, q.absmax, nf4_code(device), w.numel(), q.blocksize, dtype)
    got, want = nf4_dequantize(*args), reference.nf4_dequantize(*args)
    close(got, want)
    if dtype == torch.float32:
        assert torch.equal(got, want)  # a lookup and one multiply: no rounding freedom
    close(q.dense(dtype), want.view(shape))  # the dispatch picks the kernel under the forced Triton backend


def test_non_contiguous_source_and_other_blocksizes(device: torch.device) -> None:
    w = torch.randn(40, 90, generator=torch.Generator().manual_seed(1)).to(device).t()  # a transposed view
    q = NF4Tensor.from_dense(w, blocksize=32)
    assert q.shape == w.shape
    dense = reference.nf4_dequantize(q.packed, q.absmax, q.code, w.numel(), 32, torch.float32).view(w.shape)
    assert torch.equal(nf4_dequantize(q.packed, q.absmax, q.code, w.numel(), 32, torch.float32).view(w.shape), dense)
    assert (dense - w).abs().max() <= 0.2 * w.abs().max()
    with pytest.raises(ValueError, match="even"):
        NF4Tensor.from_dense(w, blocksize=33)


def test_the_kernel_runs_inside_a_compiled_graph(device: torch.device) -> None:
    """The compiled decode step of a QLoRA model calls the kernel from `NF4Tensor.dense`, which the compiler runs
    on fake tensors: the kernel must be an opaque op with a shape rule, not a launch traced into (on an H200 the
    launch read a fake tensor's data pointer and every compiled 4-bit decode failed)."""
    layer = torch.nn.Linear(64, 96, bias=False).to(device)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05, generator=torch.Generator(device).manual_seed(2))
    w = NF4Tensor.from_dense(layer.weight.detach())
    x = torch.randn(3, 64, device=device)
    compiled = torch.compile(lambda x: torch.nn.functional.linear(x, w.dense()), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), torch.nn.functional.linear(x, w.dense()))
