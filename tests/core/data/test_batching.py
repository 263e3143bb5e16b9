"""The batch order is a function of (seed, epoch): reproducible, different each epoch, resumable mid-epoch."""

from __future__ import annotations

import pytest

from unsloth_core.data.batching import epoch_order, iter_batches, num_batches


def test_order_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    order = epoch_order(100, seed=3, epoch=0)
    assert sorted(order) == list(range(100))
    assert order == epoch_order(100, seed=3, epoch=0)
    assert order != epoch_order(100, seed=3, epoch=1) and order != epoch_order(100, seed=4, epoch=0)
    assert order != list(range(100))
    # pinned: a resumed run on another machine or Python version must see the same order
    assert epoch_order(8, seed=0, epoch=0) == [0, 4, 2, 5, 3, 6, 7, 1]


def test_batches_cover_the_epoch() -> None:
    items = list(range(10))
    batches = list(iter_batches(items, 4, seed=0, epoch=0))
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(i for b in batches for i in b) == items
    assert [len(b) for b in iter_batches(items, 4, seed=0, epoch=0, drop_last=True)] == [4, 4]
    assert num_batches(10, 4) == 3 and num_batches(10, 4, drop_last=True) == 2
    assert list(iter_batches(items, 4, seed=0, epoch=0, shuffle=False)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError):
        next(iter_batches(items, 0, seed=0, epoch=0))


def test_resume_mid_epoch_sees_the_same_batches() -> None:
    items = [f"example-{i}" for i in range(37)]
    first_run = [b for epoch in range(2) for b in iter_batches(items, 5, seed=7, epoch=epoch)]
    # crash after 3 batches of epoch 1; the resumed run continues from there
    resumed = list(iter_batches(items, 5, seed=7, epoch=1, start=3))
    assert resumed == first_run[num_batches(37, 5) + 3:]
