"""`DataCollatorForSeq2Seq`: transformers' collator of that name for causal-LM rows, for notebooks that pass it to
`SFTTrainer(data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer))` without transformers installed.

It pads `input_ids` with the pad token and `labels` with -100 to the longest row (on the tokenizer's padding side)
and adds the attention mask. SFTTrainer batches its rows exactly so itself; it accepts this collator (and
transformers' own) because passing one changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from unsloth_core.data.sft import IGNORE_INDEX
from unsloth_core.tokenizer import Tokenizer


class DataCollatorForSeq2Seq:
    """Pads a list of rows (`input_ids`, optionally `labels`) into (B, T) tensors."""

    def __init__(self, tokenizer: Tokenizer, model: Any = None, padding: bool | str = True,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 label_pad_token_id: int = IGNORE_INDEX, return_tensors: str = "pt") -> None:
        if padding not in (True, "longest"):
            raise ValueError("DataCollatorForSeq2Seq pads to the longest row (padding=True)")
        if max_length is not None:
            raise ValueError("max_length applies to padding='max_length', which this collator does not do")
        if return_tensors != "pt":
            raise ValueError("DataCollatorForSeq2Seq returns torch tensors (return_tensors='pt')")
        self.tokenizer, self.model, self.padding = tokenizer, model, padding
        self.max_length, self.pad_to_multiple_of = max_length, pad_to_multiple_of
        self.label_pad_token_id, self.return_tensors = label_pad_token_id, return_tensors

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of
        left = self.tokenizer.padding_side == "left"

        def padded(row: Sequence[int], value: int) -> list[int]:
            fill = [value] * (n - len(row))
            return [*fill, *row] if left else [*row, *fill]

        pad = self.tokenizer.pad_token_id or 0
        batch = {"input_ids": [padded(f["input_ids"], pad) for f in features],
                 "attention_mask": [padded([1] * len(f["input_ids"]), 0) for f in features]}
        if "labels" in features[0]:
            batch["labels"] = [padded(f["labels"], self.label_pad_token_id) for f in features]
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
