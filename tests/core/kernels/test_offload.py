"""Checkpointing with the layer input kept (or offloaded): gradients equal those of running without it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.helpers import tiny_model
from unsloth_core import kernels
from unsloth_core.kernels import offload
from unsloth_core.lora import apply_lora

C, R = 16, 4


class Layer(nn.Module):
    """A residual layer with a frozen base, a trainable adapter with dropout, and a per-token side input."""

    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, C, generator=gen) / C**0.5, requires_grad=False)
        self.lora_a = nn.Parameter(torch.randn(R, C, generator=gen) / C**0.5)
        self.lora_b = nn.Parameter(torch.randn(C, R, generator=gen))

    def forward(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        y = kernels.lora_linear(x, self.weight, None, self.lora_a, self.lora_b, 2.0, 0.3, self.training)
        return x + torch.tanh(y) * gain + torch.nn.functional.dropout(y, 0.1, self.training)


def _train_step(layers: nn.ModuleList, x0: torch.Tensor, gain: torch.Tensor,
                run: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    layers.zero_grad(set_to_none=True)
    for t in (x0, gain):
        t.grad = None
    torch.manual_seed(7)  # same dropout draws in both runs
    x = x0
    for layer in layers:
        x = run(layer, x, gain)
    (x.square().sum()).backward()
    grads = [p.grad for layer in layers for p in (layer.lora_a, layer.lora_b)]
    grads += [t.grad for t in (x0, gain) if t.requires_grad]
    assert all(g is not None for g in grads)
    return [x.detach(), *grads]  # type: ignore[list-item]


@pytest.mark.parametrize("offload", [False, True])  # on the CPU offload=True keeps x where it is
@pytest.mark.parametrize("input_grad", [False, True])  # False: the first layer sits on a frozen embedding
def test_gradients_match_no_checkpointing(offload: bool, input_grad: bool, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    layers = nn.ModuleList(Layer(gen) for _ in range(3)).train().to(device)
    x0 = torch.randn(2, 5, C, generator=gen).to(device).requires_grad_(input_grad)
    gain = torch.tensor(0.7, device=device, requires_grad=input_grad)
    plain = _train_step(layers, x0, gain, lambda layer, x, g: layer(x, g))
    ckpt = _train_step(layers, x0, gain, lambda layer, x, g: kernels.checkpoint(layer, x, g, offload=offload))
    for a, b in zip(ckpt, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_outside_grad_mode_it_is_a_plain_call() -> None:
    layer = Layer(torch.Generator().manual_seed(0)).eval()
    x = torch.randn(3, C)
    with torch.no_grad():
        out = kernels.checkpoint(layer, x, torch.tensor(1.0), offload=True)
    assert out.grad_fn is None
    torch.testing.assert_close(out, layer(x, torch.tensor(1.0)))


@pytest.mark.parametrize("mode", [True, "offload"])
def test_a_checkpointed_lora_model_with_dropout_gets_the_gradients_of_an_unchecked_one(mode: bool | str) -> None:
    """The checkpointed forward runs without grad and its replay with grad: both must take the same LoRA path, or
    the replay draws other dropout masks than the forward used (a silent error in every gradient)."""
    model = apply_lora(tiny_model(seed=3), r=4, alpha=8, dropout=0.3, seed=0).train()
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))

    def grads(checkpointing: bool | str) -> list[torch.Tensor]:
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = model(x, labels=x, return_logits=False).loss
        assert loss is not None
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads(False)
    assert len(plain) == 2 * 7 * model.config.num_hidden_layers
    for a, b in zip(grads(mode), plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _torch_takes_pinned_rounding() -> bool:
    """Whether this torch takes the setting at all, asked in a fresh process (setting it here would change what the
    test checks). torch 2.11, which the H200 machine has, refuses it."""
    code = f"import torch; torch._C._accelerator_setAllocatorSettings('{offload.PINNED_ROUNDING}:64')"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_pinned_blocks_are_allocated_at_their_size(device: torch.device) -> None:
    """Offloaded inputs must not be rounded up to a power of two (twice the host memory just past one); a rounding
    setting already made (the user's PYTORCH_ALLOC_CONF, or an earlier call) is kept."""
    offload.exact_pinned_sizes.cache_clear()
    if not offload.exact_pinned_sizes():
        assert not _torch_takes_pinned_rounding(), "this torch takes the setting, but exact_pinned_sizes did not"
        pytest.skip(f"torch {torch.__version__} has no {offload.PINNED_ROUNDING} setting (blocks stay rounded)")
    settings = torch._C._accelerator_getAllocatorSettings()
    assert settings.count(offload.PINNED_ROUNDING) == 1
    offload.exact_pinned_sizes.cache_clear()
    offload.exact_pinned_sizes(threshold_mb=32)
    assert torch._C._accelerator_getAllocatorSettings() == settings
    if device.type == "cuda":
        torch._C._host_emptyCache()
        before = torch.cuda.host_memory_stats()["allocated_bytes.current"]
        n = 65 * 2**20 + 4096  # just past 64 MiB: rounded, it would take 128 MiB
        block = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        grown = torch.cuda.host_memory_stats()["allocated_bytes.current"] - before
        assert n <= grown < n + 2**20, grown
        del block
