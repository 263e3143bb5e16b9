"""Padding-free packing: several examples share one row of at most max_seq_length tokens.

A packed row carries no attention mask. Each sample's `position_ids` restart at 0, and the model reads every 0 as
the start of a new sample (`unsloth_core.model.attention_mask_4d`), so samples in a row never attend to each other
and each sees the same positions it would alone. The first label of every sample is IGNORE_INDEX: after the model's
one-token shift that is the label the previous sample's last token would predict, and no token should learn to
predict across a sample boundary.

Rows are filled best-fit decreasing (longest examples first, each into the fullest row it still fits), which wastes
a few percent at most on realistic length mixes; ties go to the earliest row, so the result is deterministic.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass

from unsloth_core.data.sft import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True)
class PackedRow:
    """One row of packed samples.

    Args:
        input_ids, labels, position_ids: the samples concatenated; all the same length, at most max_seq_length.
        seq_lens: each sample's length, in order (for varlen attention kernels that want cumulative lengths).
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    seq_lens: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: Sequence[TokenizedExample], max_seq_length: int) -> list[PackedRow]:
    """Bin-pack examples into rows; each example appears in exactly one row, whole. Empty examples are skipped.

    Raises ValueError for an example longer than max_seq_length (tokenize with the same max_seq_length first).
    """
    bins = _best_fit_decreasing([len(e) for e in examples], max_seq_length)
    return [_row([examples[i] for i in members]) for members in bins]


def _best_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices grouped into bins of total size <= capacity; within a bin, in their original order."""
    order = sorted((i for i, n in enumerate(sizes) if n > 0), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), kept sorted so the best fit is a bisection away
    for i in order:
        size = sizes[i]
        if size > capacity:
            raise ValueError(f"example {i} has {size} tokens, more than max_seq_length={capacity}")
        k = bisect_left(free, (size, -1))  # the smallest room that still fits, earliest bin among equals
        if k == len(free):
            bins.append([i])
            insort(free, (capacity - size, len(bins) - 1))
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            insort(free, (room - size, b))
    return [sorted(members) for members in bins]


def _row(samples: Sequence[TokenizedExample]) -> PackedRow:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for sample in samples:
        input_ids += sample.input_ids
        labels += [IGNORE_INDEX, *sample.labels[1:]]
        position_ids += range(len(sample))
    return PackedRow(input_ids, labels, position_ids, [len(s) for s in samples])
