"""The order the trainer sees its examples in: a pure function of (seed, epoch), so a resumed run replays it.

A job that resumes from a checkpoint after `k` micro-batches of epoch `e` calls
`iter_batches(items, batch_size, seed=seed, epoch=e, start=k)` and gets exactly the batches the first run would have
seen next, on any machine and any Python version: the shuffle draws only from `random.Random(str).random()`, the one
part of the `random` module whose sequence Python promises never to change (`random.shuffle` makes no such promise).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of range(n), the same for the same (n, seed, epoch) and different for each epoch."""
    rng = random.Random(f"unsloth-data:{seed}:{epoch}")
    order = list(range(n))
    for i in range(n - 1, 0, -1):  # Fisher-Yates
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Micro-batches per epoch."""
    return n // batch_size if drop_last else -(-n // batch_size)


def iter_batches(items: Sequence[T], batch_size: int, *, seed: int, epoch: int, start: int = 0,
                 shuffle: bool = True, drop_last: bool = False) -> Iterator[list[T]]:
    """Micro-batches of `items` for one epoch, in the order of `epoch_order(len(items), seed, epoch)` (or as given
    when `shuffle` is False, e.g. for evaluation), beginning at batch number `start` of the epoch.

    `drop_last` drops a final short batch (it keeps every batch the same shape, e.g. for CUDA graphs).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = epoch_order(len(items), seed, epoch) if shuffle else list(range(len(items)))
    for b in range(start, num_batches(len(items), batch_size, drop_last)):
        yield [items[i] for i in order[b * batch_size:(b + 1) * batch_size]]
