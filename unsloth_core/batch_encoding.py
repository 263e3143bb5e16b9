"""What `tokenizer(...)` returns, as transformers' `BatchEncoding`: a dict of `input_ids` and `attention_mask`
(lists, or tensors with `return_tensors="pt"`) that also reads as attributes and moves with `.to(device)`, so
`model.generate(**tokenizer(text, return_tensors="pt").to(device))` ports unchanged. Padding and truncation of a
batch of token id lists live here too: they are what turns ragged lists into one tensor.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

PADDING = {True: "longest", "longest": "longest", "max_length": "max_length", False: None, "do_not_pad": None}
TRUNCATION = {True: True, "longest_first": True, "only_first": True, False: False, "do_not_truncate": False}
SIDES = ("left", "right")


def _is_tensor(value: Any) -> bool:
    # torch is imported only once a caller asks for tensors: the data validators import the tokenizer and must
    # stay torch-free (they run in the API process before any model is loaded).
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(value, torch_module.Tensor)


class BatchEncoding(dict[str, Any]):
    """`input_ids` and `attention_mask` by key or attribute; `.to(device)` moves the tensors (a no-op on lists)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        for key, value in self.items():
            if _is_tensor(value):
                self[key] = value.to(device)
        return self


def check_choice(name: str, value: Any, table: dict[Any, Any]) -> Any:
    if value not in table:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, table))}")
    return table[value]


def truncate(rows: list[list[int]], max_length: int | None, side: str) -> list[list[int]]:
    if max_length is None:
        raise ValueError("truncation=True needs max_length (the tokenizer has no model_max_length)")
    return [r[len(r) - max_length:] if side == "left" and len(r) > max_length else r[:max_length] for r in rows]


def pad(rows: list[list[int]], padding: str, max_length: int | None, pad_id: int | None, side: str,
        multiple_of: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Rows padded to the longest (or to `max_length`) on `side`, and their attention masks (1 = real token)."""
    if padding == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length")
    width = max_length if padding == "max_length" and max_length is not None else max(map(len, rows), default=0)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    if pad_id is None and any(len(r) < width for r in rows):
        raise ValueError("asked to pad, but the tokenizer has no pad token: set tokenizer.pad_token "
                         "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
    ids, masks = [], []
    for r in rows:
        fill, ones = [pad_id or 0] * (width - len(r)), [1] * len(r)
        ids.append(fill + r if side == "left" else r + fill)
        masks.append([0] * len(fill) + ones if side == "left" else ones + [0] * len(fill))
    return ids, masks


def as_tensors(data: dict[str, list[list[int]]], return_tensors: str | None, batched: bool) -> dict[str, Any]:
    """Lists as given (one row unwrapped when the input was one text), or (B, T) tensors / arrays (one text too is
    a batch of one, as in transformers)."""
    if return_tensors is None:
        return {k: v if batched else v[0] for k, v in data.items()}
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'pt' (torch) or 'np' (numpy)")
    out: dict[str, Any] = {}
    for key, rows in data.items():
        if len({len(r) for r in rows}) > 1:
            raise ValueError("the texts have different lengths: pass padding=True (or truncation=True with "
                             "max_length) to make one tensor of them")
        array = np.array(rows, dtype=np.int64).reshape(len(rows), -1)
        if return_tensors == "pt":
            import torch

            out[key] = torch.from_numpy(array)
        else:
            out[key] = array
    return out


def rows_of(ids: Any) -> list[list[int]]:
    """Token id rows from a (B, T) tensor / array or a list of lists."""
    if _is_tensor(ids) or isinstance(ids, np.ndarray):
        if ids.ndim != 2:
            raise ValueError(f"expected token ids of shape (batch, tokens), got {tuple(ids.shape)}")
        return [list(map(int, r)) for r in ids.tolist()]
    return [list(map(int, r)) for r in ids]


def one_row(ids: Any) -> list[int]:
    """Token ids from an int, a 1-D tensor / array, or a sequence of ints."""
    if _is_tensor(ids) or isinstance(ids, np.ndarray):
        if ids.ndim > 1:
            raise ValueError(f"decode takes one sequence of token ids, got shape {tuple(ids.shape)}; "
                             f"use batch_decode for a batch")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids] if isinstance(ids, Sequence) else [int(i) for i in list(ids)]
