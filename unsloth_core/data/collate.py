"""Lists of token ids -> right-padded tensors for the model.

Right padding never changes what the real tokens compute: attention is causal, so a real token never sees the pads
after it, and pads get label IGNORE_INDEX. `attention_mask` is returned for completeness (and for left-padded
generation elsewhere), but a trainer may drop it for right-padded batches and keep SDPA's plain causal path.

torch is imported inside the functions: the API process imports this package to validate uploads and must stay light.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from unsloth_core.data.packing import PackedRow
from unsloth_core.data.preference import TokenizedPreference
from unsloth_core.data.sft import IGNORE_INDEX, TokenizedExample

if TYPE_CHECKING:
    from torch import Tensor


def collate(batch: Sequence[TokenizedExample | PackedRow], pad_id: int,
            pad_to_multiple_of: int = 1) -> dict[str, Tensor]:
    """(B, T) tensors `input_ids`, `labels` (IGNORE_INDEX on pads), `attention_mask` (1 on real tokens) and
    `position_ids`. Packed rows keep their per-sample positions.

    Pad positions continue counting from the row's last real position, so a pad is never mistaken for the start of
    a new packed sample (position 0).
    """
    import torch

    t = max(len(row) for row in batch)
    t = -(-t // pad_to_multiple_of) * pad_to_multiple_of  # round up, e.g. to 8 for tensor cores
    b = len(batch)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    position_ids = torch.arange(t, dtype=torch.long).repeat(b, 1)
    for i, row in enumerate(batch):
        n = len(row)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
        if isinstance(row, PackedRow) and n:
            position_ids[i, :n] = torch.tensor(row.position_ids)
            position_ids[i, n:] = torch.arange(row.position_ids[-1] + 1, row.position_ids[-1] + 1 + t - n)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}


def collate_preference(batch: Sequence[TokenizedPreference], pad_id: int,
                       pad_to_multiple_of: int = 1) -> dict[str, Tensor]:
    """The DPO batch: rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected, one forward for both.

    Labels cover the reply tokens only, so the sum of a row's label log-probabilities is log p(reply | prompt).
    """
    rows = [TokenizedExample([*p.prompt_ids, *reply], [IGNORE_INDEX] * len(p.prompt_ids) + list(reply))
            for replies in ([p.chosen_ids for p in batch], [p.rejected_ids for p in batch])
            for p, reply in zip(batch, replies)]
    return collate(rows, pad_id, pad_to_multiple_of)
