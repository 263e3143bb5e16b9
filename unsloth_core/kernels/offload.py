"""Gradient checkpointing of a decoder layer that keeps only the layer's input, optionally in pinned host memory.

Forward runs the layer without recording a graph and keeps its input x: on a GPU with `offload=True` as a copy in
pinned CPU memory, made on a side stream so it overlaps the next layers' compute (the GPU copy of x is then free
to go); otherwise on the device as it is. Backward brings x back, replays the layer with the forward's RNG state and
autocast settings (so dropout masks match), and backpropagates through the replay.

Like torch's reentrant checkpoint, parameter gradients reach `.grad` through an inner `torch.autograd.backward`:
use `loss.backward()` with it, not `torch.autograd.grad` on parameters inside the layer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Makes the Function's output require grad when neither x nor any argument does (the first layer under LoRA: a
# frozen embedding), so backward still reaches the trainable weights inside the layer.
_ANCHOR = torch.empty(0, requires_grad=True)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


PINNED_ROUNDING = "pinned_max_round_threshold_mb"


@functools.cache
def exact_pinned_sizes(threshold_mb: int = 64) -> bool:
    """Make pinned host blocks above `threshold_mb` exactly the size asked for; False where that is not possible.

    The pinned-memory cache rounds each block up to a power of two. Offloaded layer inputs are large and all one
    size, so just past a power of two every one of them takes twice its size: at 300k tokens a Llama-8B layer input
    (2.3 GiB) would take 4 GiB, 32 of them more host memory than a 128 GiB machine has, and the longest trainable
    sequence would stop near 262k instead of 390k. A setting the user made (PYTORCH_ALLOC_CONF) is kept.
    """
    try:
        settings = torch._C._accelerator_getAllocatorSettings()
        if PINNED_ROUNDING not in settings:
            torch._C._accelerator_setAllocatorSettings(",".join(filter(None, [settings,
                                                                          f"{PINNED_ROUNDING}:{threshold_mb}"])))
    except (AttributeError, RuntimeError):  # a torch without the setting: blocks stay rounded
        return False
    return True


class _HostCopy:
    """A pinned host copy of a CUDA tensor, made on a side stream so it overlaps the compute that follows."""

    def __init__(self, x: Tensor) -> None:
        self.device = x.device
        stream = _side_stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x must be fully written before it is copied
        exact_pinned_sizes()
        self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            self.host.copy_(x, non_blocking=True)
            self.copied = stream.record_event()
        x.record_stream(stream)  # the allocator must not hand x's memory out until the copy has read it

    def load(self) -> Tensor:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self.copied)
        return self.host.to(self.device, non_blocking=True)  # ordered before anything later on this stream


class _RNGState:
    """The CPU and (for a CUDA x) device generator states, so the replay draws the same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, d)


class CheckpointFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], offload: bool, _anchor: Tensor, x: Tensor,
                *args: Any) -> Tensor:
        device_type = x.device.type
        ctx.fn, ctx.args = fn, args
        ctx.rng = _RNGState(x.device)
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type),
                        torch.is_autocast_enabled(device_type))
        with torch.no_grad():
            out = fn(x, *args)
        if offload and x.is_cuda:
            ctx.host_copy = _HostCopy(x)
        else:
            ctx.save_for_backward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        needs = ctx.needs_input_grad
        x = ctx.host_copy.load() if hasattr(ctx, "host_copy") else ctx.saved_tensors[0]
        x = x.detach().requires_grad_(needs[3])
        args = [a.detach().requires_grad_(need) if isinstance(a, Tensor) else a
                for a, need in zip(ctx.args, needs[4:], strict=True)]
        device_type, dtype, enabled = ctx.autocast
        with torch.random.fork_rng(devices=ctx.rng.devices), torch.enable_grad(), \
                torch.autocast(device_type, dtype=dtype, enabled=enabled):
            ctx.rng.restore()
            out = ctx.fn(x, *args)
        if out.requires_grad:
            torch.autograd.backward(out, grad)
        arg_grads = [a.grad if isinstance(a, Tensor) and need else None
                     for a, need in zip(args, needs[4:], strict=True)]
        return None, None, None, x.grad if needs[3] else None, *arg_grads


def checkpoint(fn: Callable[..., Tensor], x: Tensor, *args: Any, offload: bool = False) -> Tensor:
    """fn(x, *args), keeping only x (and args) for backward and recomputing the rest there.

    `offload=True` moves x to pinned host memory while it waits (CUDA only; elsewhere it stays where it is).
    Outside of grad mode this is just fn(x, *args).
    """
    if not torch.is_grad_enabled():
        return fn(x, *args)
    return CheckpointFunction.apply(fn, offload, _ANCHOR, x, *args)
