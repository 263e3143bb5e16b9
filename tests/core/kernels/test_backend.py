"""Backend selection, lazy triton import, and the kernels inside a real (tiny) Llama against the reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from unsloth_core import kernels
from unsloth_core.config import LlamaConfig
from unsloth_core.kernels.backend import use_triton
from unsloth_core.model import Llama


@pytest.mark.usefixtures("reference_backend")
def test_set_backend_validates_and_auto_keeps_cpu_on_the_reference() -> None:
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_backend("cuda")
    x = torch.zeros(1)
    assert not use_triton("rms_norm", x)
    kernels.set_backend("auto")
    assert not use_triton("rms_norm", x)  # auto: Triton only on CUDA tensors
    kernels.set_backend("triton")
    assert use_triton("rms_norm", x)


def test_import_needs_no_triton_and_reads_the_environment() -> None:
    code = ("import sys, unsloth_core, unsloth_core.kernels as k; "
            "assert 'triton' not in sys.modules, 'triton imported'; print(k.get_backend())")
    env = {**os.environ, "UNSLOTH_KERNELS": "Reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"


def _loss_and_grads(model: Llama, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    labels: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids, position_ids=position_ids, labels=labels, return_logits=False)
    assert out.loss is not None
    out.loss.backward()
    return [out.loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]


def test_tiny_llama_matches_the_reference_backend(device: torch.device) -> None:
    """RMSNorm, RoPE (in place on the attention views, packed positions), SwiGLU and the chunked loss together."""
    model = Llama(LlamaConfig.from_name("tiny"))
    model.init_weights(seed=0, std=0.5)
    model.to(device)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=gen).to(device)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3], list(range(8))], device=device)  # row 0 packs two
    labels = input_ids.clone()
    labels[:, :2] = kernels.IGNORE_INDEX
    previous = kernels.get_backend()
    try:
        kernels.set_backend("reference")
        want = _loss_and_grads(model, input_ids, position_ids, labels)
        kernels.set_backend("triton")
        got = _loss_and_grads(model, input_ids, position_ids, labels)
    finally:
        kernels.set_backend(previous)
    assert len(got) == len(want) == 1 + len(list(model.parameters()))
    for a, b in zip(got, want, strict=True):
        # The absolute error of a sum in another order scales with its terms, not its result: on an H200 one element
        # of the tied embedding's gradient (-0.012, where the tensor reaches 14.7) differed by 1.2e-5. So atol is
        # relative to the tensor's largest magnitude.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()))
