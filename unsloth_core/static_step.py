"""The serving engine's decode step at static shapes, compiled, and on a GPU replayed from CUDA graphs.

BatchEngine's eager step runs exactly its live rows and reads only the cache slots in use. On a GPU that is ~350
kernel launches from Python per token: one served stream of Llama-1B made 63.8 tok/s on an H200 where `Generator`'s
captured step made 653 (bench/RESULTS.md). Here the step has static shapes, so it can be compiled and captured:
- the batch is padded to a power of two (at most the cache's rows). The padding rows feed token 0 at the last slot
  of cache rows past the live ones, a slot every request writes before it reads it;
- attention spans every slot of the cache, each row masked by its own position.
torch.compile traces the step once with dynamic shapes; on a GPU each (batch bucket, cache slots) shape is then
captured as its own CUDA graph (cuda_graphs.py), so a new shape costs a capture, not a compile.

Base rows only: the adapter pool's batched LoRA plans its work on the host each step, so a batch with adapter rows
takes the eager step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from unsloth_core.cuda_graphs import GraphedStep, addresses
from unsloth_core.model import Llama

MAX_GRAPHS = 48  # (batch bucket, cache slots) shapes captured per engine; past it the compiled step runs ungraphed


class StaticStep:
    """Next-token logits for rows [0, B) of the model's KV cache, at static shapes."""

    def __init__(self, model: Llama) -> None:
        self.model = model
        # The KV cache is a module buffer, whose sizes dynamo specializes: each (batch bucket, cache rows, slots)
        # is a compile of its own (0.4-5 s on the CPU after the first, with inductor's cache; 6 buckets and a few
        # cache sizes in a server's life). Past dynamo's default of 8 the step would fall back to eager for good.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        compiled = torch.compile(self._forward, fullgraph=True, dynamic=True)
        self._graphs = GraphedStep(compiled, MAX_GRAPHS) if model.device.type == "cuda" else None
        self._fn: Callable[..., Tensor] = self._graphs if self._graphs is not None else compiled
        self._masks: dict[tuple[int, int], Tensor] = {}
        self._inputs: dict[int, Tensor] = {}  # per batch bucket: (2, bucket, 1) tokens and slots, padded
        self._addresses: tuple[int, ...] = ()

    def check(self) -> None:
        """Drop captured graphs when the weights or the cache have moved (call after the cache may have grown)."""
        where = addresses(self.model)
        if where != self._addresses:
            self.reset()
            self._addresses = where

    def reset(self) -> None:
        if self._graphs is not None:
            self._graphs.reset()
        self._masks.clear()
        self._inputs.clear()

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits (B, V) in fp32 for row i feeding `tokens[i]` at slot `positions[i]` ((B,) on the model's device:
        padding them is device work, so the host never waits here)."""
        shape = self.model.cache_shape
        assert shape is not None, "the engine sets up the cache before decoding"
        rows, slots = shape
        b = tokens.size(0)
        bucket = min(rows, 1 << (b - 1).bit_length())
        padded = self._inputs.get(bucket)
        if padded is None:
            padded = self._inputs[bucket] = torch.zeros(2, bucket, 1, dtype=torch.long, device=self.model.device)
        padded[0, :b, 0] = tokens
        padded[1, :b, 0] = positions
        # Rows past the batch feed token 0 at the cache's last slot: a row being prefilled in chunks may be among
        # them, and its slots from the next chunk's on are written before they are read (its last, by then, too).
        padded[0, b:] = 0
        padded[1, b:] = slots - 1
        mask = self._masks.get((bucket, slots))
        if mask is None:
            mask = self._masks[(bucket, slots)] = torch.ones(bucket, slots, dtype=torch.bool,
                                                             device=self.model.device)
        return self._fn(padded[0], padded[1], mask)[:b].clone()  # a graph's output is overwritten by its next replay

    def _forward(self, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        hidden = self.model.hidden_states(tokens, positions, mask, positions)
        return self.model.lm_head(hidden[:, -1]).float()
