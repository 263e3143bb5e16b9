"""A compiled step replayed from CUDA graphs that this module captures itself, one per input shape.

`torch.compile(mode="reduce-overhead")` captures graphs too, but its graph trees do bookkeeping in Python on every
replay (checking each static input's address, tracking which outputs are still alive). At batch 1 a Llama-1B decode
step is ~1.4 ms of GPU work, and on an H200 the host's share between replays left the GPU idle ~0.4 ms of each
1.8 ms step (bench/RESULTS.md). Here a replay is a few input copies and one `graph.replay()`.

What a caller must keep: every tensor the step reads that is not an argument (weights, KV cache) stays at its
address while graphs are kept; `reset()` drops them when one moves (a cache reallocated, weights converted).
A replay's output is overwritten by the next replay: copy what you keep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Key = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]  # the static buffers the graph reads its arguments from
    output: Tensor


class GraphedStep:
    """Calls `fn(*args)` (tensor arguments, one tensor out) through a CUDA graph captured for the arguments' shapes."""

    def __init__(self, fn: Callable[..., Tensor], max_graphs: int) -> None:
        self.fn, self.max_graphs = fn, max_graphs
        self.graphs: dict[Key, _Captured] = {}
        self.pool: Any = None  # one memory pool for all: replays never overlap

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None

    def __call__(self, *args: Tensor) -> Tensor:
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        captured = self.graphs.get(key)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(*args)  # past the limit: the compiled step without a graph
            captured = self.graphs[key] = self._capture(args)
        for buffer, arg in zip(captured.inputs, args):
            buffer.copy_(arg, non_blocking=True)
        captured.graph.replay()
        return captured.output

    def _capture(self, args: tuple[Tensor, ...]) -> _Captured:
        inputs = [a.clone() for a in args]
        # Warm-up on a side stream, as CUDA graph capture wants: it compiles (and autotunes) the step outside the
        # capture. The step's side effects (KV-cache writes) are those of the call that follows, so repeating
        # them changes nothing.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = self.fn(*inputs)
        return _Captured(graph, inputs, output)


def addresses(module: torch.nn.Module) -> tuple[int, ...]:
    """Where each parameter and buffer of `module` is (the inner tensors of a subclass such as NF4): a graph
    captured while these held is stale once they change."""
    out: list[int] = []
    for t in [*module.parameters(), *module.buffers()]:
        flatten = getattr(t, "__tensor_flatten__", None)
        inner = [getattr(t, name) for name in flatten()[0]] if flatten is not None else [t]
        out.extend(x.data_ptr() for x in inner)
    return tuple(out)
