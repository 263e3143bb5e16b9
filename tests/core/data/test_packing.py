"""Collation and padding-free packing; a packed row computes exactly what its samples compute alone."""

from __future__ import annotations

import random

import pytest
import torch

from tests.helpers import tiny_model
from unsloth_core.data.collate import collate
from unsloth_core.data.packing import PackedRow, pack
from unsloth_core.data.sft import IGNORE_INDEX, TokenizedExample


def example(n: int, start: int = 1, prompt: int = 0) -> TokenizedExample:
    """n tokens start, start+1, ...; the first `prompt` of them without loss."""
    ids = list(range(start, start + n))
    return TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:])


def test_collate_right_pads() -> None:
    batch = collate([example(3, prompt=1), example(5, start=10)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [10, 11, 12, 13, 14]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, -100], [10, 11, 12, 13, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate([example(3)], pad_id=0, pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def test_pack_resets_positions_and_masks_sample_starts() -> None:
    examples = [example(4, start=10), example(3, start=20, prompt=1), example(2, start=30)]
    rows = pack(examples, max_seq_length=10)
    assert len(rows) == 1
    row = rows[0]
    assert row.input_ids == [10, 11, 12, 13, 20, 21, 22, 30, 31]
    assert row.position_ids == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    # each sample's first label is ignored, so no token learns to predict the next sample's first token
    assert row.labels == [-100, 11, 12, 13, -100, 21, 22, -100, 31]
    assert row.seq_lens == [4, 3, 2]


def test_pack_is_a_deterministic_partition_within_the_limit() -> None:
    rng = random.Random(0)
    examples = [example(rng.randint(1, 64), start=1000 * i) for i in range(200)]
    rows = pack(examples, max_seq_length=64)
    assert rows == pack(examples, max_seq_length=64)
    assert all(len(r) <= 64 and len(r.labels) == len(r.position_ids) == len(r) for r in rows)
    starts = sorted(r.input_ids[sum(r.seq_lens[:k])] for r in rows for k in range(len(r.seq_lens)))
    assert starts == [1000 * i for i in range(200)]  # every example exactly once, whole
    total = sum(len(e) for e in examples)
    assert len(rows) <= -(-total // 64) * 1.05 + 1  # best-fit decreasing wastes little


def test_pack_refuses_overlong_and_skips_empty() -> None:
    with pytest.raises(ValueError, match="max_seq_length=4"):
        pack([example(5)], max_seq_length=4)
    assert pack([TokenizedExample([], []), example(2)], 4) == [PackedRow([1, 2], [-100, 2], [0, 1], [2])]


def test_collate_keeps_packed_positions_and_never_pads_with_a_sample_start() -> None:
    rows = [PackedRow([1, 2, 3], [-100, 2, 3], [0, 1, 0], [2, 1]), PackedRow([4, 5, 6, 7, 8], [-100] * 5,
                                                                             [0, 1, 2, 3, 4], [5])]
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert batch["labels"][0].tolist() == [-100, 2, 3, -100, -100]


def test_packed_row_computes_what_each_sample_computes_alone() -> None:
    torch.manual_seed(0)
    model = tiny_model()
    examples = [TokenizedExample(ids, [IGNORE_INDEX, *ids[1:]]) for ids in
                (torch.randint(0, 256, (n,)).tolist() for n in (7, 12, 5))]
    (row,) = pack(examples, max_seq_length=32)
    packed = collate([row], pad_id=0)
    with torch.no_grad():
        out = model(packed["input_ids"], position_ids=packed["position_ids"], labels=packed["labels"])
        logits, offset, loss_sum, n_tokens = [], 0, 0.0, 0
        for n in row.seq_lens:
            sample = row.input_ids[offset:offset + n]
            alone = model(torch.tensor([sample]), labels=torch.tensor([sample]))
            logits.append(alone.logits[0])
            loss_sum += float(alone.loss_sum)
            n_tokens += int(alone.n_tokens)
            offset += n
    torch.testing.assert_close(out.logits[0], torch.cat(logits), atol=1e-4, rtol=1e-4)  # masked vs causal SDPA
    # the same targets, and no prediction across a sample boundary
    assert int(out.n_tokens) == n_tokens == sum(n - 1 for n in row.seq_lens)
    assert float(out.loss_sum) == pytest.approx(loss_sum, rel=1e-4)
