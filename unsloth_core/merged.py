"""Merged projections for generation: q, k and v read as one weight, gate and up as another.

A decode step at a small batch is bound by reading weights, and each GEMV launch has a fixed cost besides: on an
H200, Llama-1B's 2-8 MB k/v/q projections ran at 5-11 us a call, launch- and tail-bound (bench/RESULTS.md). One
GEMV over the concatenated weights makes three launches one and reads the bytes at a better rate, as vLLM's merged
linears do. HF's parameter names stay: each separate weight becomes a view into the merged tensor, so merging adds
no memory, and an in-place update of either (an optimizer step, a LoRA merge, `load_state_dict`) is seen by both.

Reading merged weights is switched on only around the engine's forwards (`merged_projections`), and only after a
check that each parameter is still a view at its place in the merged tensor: a dtype change (`model.to`), a
`p.data = ...` (the trainer's fp32 masters) or a new Parameter gives a weight new storage, and then the layers are
merged again. Outside that, and wherever gradients are recorded, the layers run one by one.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class MergedProjections(nn.Module):
    """Owns the merged weight (and bias) of some linear layers that read the same input."""

    weight: Tensor | None
    bias: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        # Buffers, not plain attributes: a compiled, CUDA-graphed step then treats them as static (never copied in).
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)
        self.sizes: tuple[int, ...] = ()
        self._kept: tuple[Tensor, Tensor | None] | None = None  # the merged tensors while switched off

    def active(self) -> bool:
        return self.weight is not None and not torch.is_grad_enabled()

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        assert self.weight is not None
        return torch.nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)

    def switch_on(self, layers: Sequence[nn.Module]) -> bool:
        """Merge (or check the earlier merge of) `layers` and read them merged; False where they cannot be."""
        linears = [layer for layer in layers if mergeable(layer)]
        if len(linears) != len(layers) or not compatible(linears):  # type: ignore[arg-type]
            return False
        if self._kept is None or not intact(self._kept, linears):  # type: ignore[arg-type]
            self._kept = merge(linears)  # type: ignore[arg-type]
            self.sizes = tuple(layer.out_features for layer in linears)  # type: ignore[misc]
        self.weight, self.bias = self._kept
        return True

    def switch_off(self) -> None:
        self.weight = self.bias = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A conversion (`.to`, `.half`) would copy the merged tensors apart from the layers' own: drop them instead.
        self._kept = None
        self.switch_off()
        return super()._apply(fn, recurse)


def mergeable(layer: nn.Module) -> bool:
    """A plain dense linear layer (not LoRA, not pooled adapters, not a quantized weight)."""
    return type(layer) is nn.Linear and type(layer.weight.detach()) is Tensor and layer.weight.is_contiguous()


def compatible(layers: Sequence[nn.Linear]) -> bool:
    first = layers[0].weight
    same = all(layer.weight.dtype == first.dtype and layer.weight.device == first.device
               and layer.in_features == layers[0].in_features for layer in layers)
    with_bias = {layer.bias is not None for layer in layers}
    return same and len(with_bias) == 1


def merge(layers: Sequence[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """Concatenate the layers' weights (and biases) and make each layer's parameter a view of its rows.

    Not an inference tensor even when merged inside `torch.inference_mode()` (generation is): the parameters become
    views of it, and a later training step could not save them for backward."""
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([layer.weight for layer in layers])
        for layer, rows in zip(layers, weight.split([layer.out_features for layer in layers])):
            layer.weight.data = rows
        bias = None
        if layers[0].bias is not None:
            bias = torch.cat([layer.bias for layer in layers])
            for layer, part in zip(layers, bias.split([layer.out_features for layer in layers])):
                layer.bias.data = part
    return weight, bias


def intact(merged: tuple[Tensor, Tensor | None], layers: Sequence[nn.Linear]) -> bool:
    """Each layer's weight (and bias) is still the view at its place in the merged tensors."""
    weight, bias = merged
    offset = 0
    for layer in layers:
        if not is_view_at(layer.weight, weight, offset):
            return False
        if bias is not None and (layer.bias is None or not is_view_at(layer.bias, bias, offset)):
            return False
        offset += layer.out_features
    return True


def is_view_at(part: Tensor, whole: Tensor, row: int) -> bool:
    stride = whole.stride(0) * whole.element_size()
    return (part.dtype == whole.dtype and part.device == whole.device and part.is_contiguous()
            and part.data_ptr() == whole.data_ptr() + row * stride)


def merge_groups(model: nn.Module) -> Iterator[tuple[MergedProjections, list[nn.Module]]]:
    """Each block's (q, k, v) and (gate, up) with the module that merges them."""
    for block in model.model.layers:  # type: ignore[union-attr]
        attn, mlp = block.self_attn, block.mlp
        yield attn.merged, [attn.q_proj, attn.k_proj, attn.v_proj]
        yield mlp.merged, [mlp.gate_proj, mlp.up_proj]


# Models inside a `merged_projections` context, and how deep: a nested one (the engine's step inside a driver's
# whole run) neither checks the merge again (about 2 ms a step on SmolLM2's 60 groups) nor switches it off early.
_DEPTH: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


@contextmanager
def merged_projections(model: nn.Module) -> Iterator[int]:
    """Read q/k/v and gate/up merged inside the block, where the layers allow it; yields how many groups do."""
    groups = list(merge_groups(model))
    depth = _DEPTH.get(model, 0)
    on = ([merged for merged, _ in groups if merged.weight is not None] if depth else
          [merged for merged, layers in groups if merged.switch_on(layers)])
    _DEPTH[model] = depth + 1
    try:
        yield len(on)
    finally:
        _DEPTH[model] = depth
        if not depth:
            for merged in on:
                merged.switch_off()
