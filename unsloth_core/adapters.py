"""Many LoRA adapters served on one base model in one batch (the S-LoRA / Punica idea).

An `AdapterPool` installs a `PooledLinear` in place of each of the seven projections of every block (same weight
and bias, so nothing is copied) and keeps every loaded adapter stacked per projection: A as (slots, R, in) and B
transposed as (slots, R, out), fp32 as PEFT keeps them, ranks zero-padded to the largest loaded R (padding adds
nothing).
Adapters of different ranks and target modules share the stacks: a projection an adapter does not target holds
zeros and scale 0 in its slot.

Before each forward the engine says which slot each token uses (`use`; -1 is the base model), and each projection
adds its rows' updates in one batched op (`kernels.lora_bgmv_`: a Triton kernel on a GPU, grouped matmuls
elsewhere). With no adapter in the batch the projections are the base model's, at its speed.

Slots are reused least recently used first (`capacity` at most), and a slot held by a running request (`acquire`
until `release`) is never reused. Loading writes a free slot, or new, larger stacks that then replace the old ones
layer by layer: a step running meanwhile reads the same values for the slots it uses either way, so loads never
pause decoding.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from unsloth_core import kernels
from unsloth_core.config import PROJECTIONS
from unsloth_core.errors import CapacityError, ModelFormatError
from unsloth_core.lora import read_adapter_config, read_adapter_tensors
from unsloth_core.model import Llama
from unsloth_core.quant import linear as base_linear

BASE = -1  # the slot of a row on the base model


class PooledLinear(nn.Linear):
    """A base projection (the same weight and bias) plus the update of each row's adapter from the pool's stacks."""

    def __init__(self, linear: nn.Linear, pool: AdapterPool) -> None:
        with torch.device("meta"):
            super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight, self.bias = linear.weight, linear.bias
        self.pool = pool
        # (A (slots, R, in), B transposed (slots, R, out), scales (slots,)): one attribute, so a forward reads one
        # version of the three while a load swaps in larger ones.
        self.stacks: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        y = base_linear(x, self.weight, self.bias)
        index = self.pool.index
        if index is None:  # base rows only: the stacks are not even read, so a compiled base step (static_step.py)
            return y       # holds no guard on them and an adapter load never recompiles it
        stacks = self.stacks
        if stacks is None:
            return y
        flat = y.view(-1, y.size(-1))  # F.linear's output is contiguous: updated in place through the view
        kernels.lora_bgmv_(flat, x.reshape(-1, x.size(-1)), *stacks, index)
        return y


class AdapterPool:
    """The loaded adapters of one base model. `load` from any thread; `acquire`/`release` around a request's life;
    `use` and `clear` around each forward, on the thread that runs the model."""

    def __init__(self, model: Llama, capacity: int = 16) -> None:
        if capacity < 1:
            raise ValueError("an adapter pool needs at least one slot")
        self.model, self.capacity = model, capacity
        self.layers: dict[str, PooledLinear] = {}
        for i, block in enumerate(model.blocks()):
            for owner, names in ((block.self_attn, PROJECTIONS[:4]), (block.mlp, PROJECTIONS[4:])):
                for name in names:
                    layer = PooledLinear(getattr(owner, name), self)
                    setattr(owner, name, layer)
                    self.layers[f"model.layers.{i}.{'self_attn' if owner is block.self_attn else 'mlp'}.{name}"] = layer
        self.index: Tensor | None = None  # (tokens,) slot of each token of the running forward; None: all base
        self._slots: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._refs: dict[int, int] = {}  # slot -> running requests using it
        self._rank = 0
        self._size = 0  # slots allocated in the stacks
        self._lock = threading.Lock()  # guards the maps; loads also hold `_loading` (one at a time)
        self._loading = threading.Lock()

    # ---- loading ----

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def load(self, name: str, directory: str | os.PathLike[str]) -> None:
        """Make adapter `name` (a PEFT directory) servable; a no-op when it is loaded already."""
        with self._loading:
            with self._lock:
                if name in self._slots:
                    self._slots.move_to_end(name)
                    return
            config = read_adapter_config(directory)
            if config.modules_to_save:
                raise ModelFormatError(f"adapter {name} trains {config.modules_to_save} as well: it changes more than "
                                       "low-rank updates and cannot share a batch with other adapters")
            tensors = read_adapter_tensors(directory)
            with self._lock:
                slot = self._free_slot()
            self._fit(slot + 1, config.r)
            self._write(slot, tensors, config.scaling, name, directory)
            with self._lock:
                self._slots[name] = slot

    def _free_slot(self) -> int:
        """A slot for a new adapter: never used, or the least recently used one no request holds. Caller locks."""
        used = set(self._slots.values())
        for slot in range(self.capacity):
            if slot not in used:
                return slot
        for name, slot in self._slots.items():
            if not self._refs.get(slot):
                del self._slots[name]
                return slot
        raise CapacityError(f"all {self.capacity} adapter slots are held by running requests; retry later")

    def _fit(self, size: int, rank: int) -> None:
        """Grow the stacks to `size` slots and rank `rank` (doubling slots), copying what they hold."""
        if size <= self._size and rank <= self._rank:
            return
        new_size = min(self.capacity, max(size, 2 * self._size, 1))
        new_rank = max(rank, self._rank)
        device = self.model.device
        for layer in self.layers.values():
            a = torch.zeros(new_size, new_rank, layer.in_features, device=device)
            b = torch.zeros(new_size, new_rank, layer.out_features, device=device)
            scales = torch.zeros(new_size, device=device)
            if layer.stacks is not None:
                old_a, old_b, old_scales = layer.stacks
                a[: self._size, : self._rank] = old_a
                b[: self._size, : self._rank] = old_b
                scales[: self._size] = old_scales
            layer.stacks = (a, b, scales)
        self._size, self._rank = new_size, new_rank

    @torch.no_grad()
    def _write(self, slot: int, tensors: dict[str, Tensor], scaling: float, name: str,
               directory: str | os.PathLike[str]) -> None:
        unknown = {k.rsplit(".lora_", 1)[0] for k in tensors} - self.layers.keys()
        if unknown:
            raise ModelFormatError(f"adapter {name} in {directory} does not fit this model: it has weights for "
                                   f"{sorted(unknown)[:3]}")
        for key, layer in self.layers.items():
            assert layer.stacks is not None
            stack_a, stack_b, scales = layer.stacks
            stack_a[slot].zero_()
            stack_b[slot].zero_()
            a, b = tensors.get(f"{key}.lora_A.weight"), tensors.get(f"{key}.lora_B.weight")
            if a is None or b is None:
                scales[slot] = 0.0  # not a target of this adapter
                continue
            r = a.size(0)
            if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                raise ModelFormatError(f"adapter {name}: {key} has shapes {tuple(a.shape)} and {tuple(b.shape)}, "
                                       f"this model needs ({r}, {layer.in_features}) and ({layer.out_features}, {r})")
            stack_a[slot, :r] = a
            stack_b[slot, :r] = b.t()
            scales[slot] = scaling

    def remove(self, name: str) -> bool:
        """Forget an adapter (its slot is reused by the next load); False while a request still uses it."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                return True
            if self._refs.get(slot):
                return False
            del self._slots[name]
            return True

    # ---- requests ----

    def acquire(self, name: str) -> int:
        """The slot of a loaded adapter, held (never reused) until `release`."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:  # never loaded, or its slot went to another adapter since: the server is full
                raise CapacityError(f"adapter {name!r} is not loaded (its slot went to another adapter); retry")
            self._slots.move_to_end(name)
            self._refs[slot] = self._refs.get(slot, 0) + 1
            return slot

    def release(self, slot: int) -> None:
        if slot == BASE:
            return
        with self._lock:
            self._refs[slot] -= 1

    # ---- forwards ----

    def use(self, slots: Sequence[int], tokens_per_row: int) -> None:
        """The slot of each row of the next forward (each row `tokens_per_row` tokens); all-base needs no index."""
        if all(s == BASE for s in slots):
            self.index = None
            return
        index = torch.tensor(slots, dtype=torch.int32).repeat_interleave(tokens_per_row)
        self.index = index.to(self.model.device, non_blocking=True)

    def clear(self) -> None:
        self.index = None
