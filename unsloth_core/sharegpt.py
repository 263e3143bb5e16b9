"""`standardize_sharegpt`: ShareGPT conversations (`{"from": "human", "value": ...}`) in the shape chat templates
read (`{"role": "user", "content": ...}`), for a list of rows or a Hugging Face `datasets.Dataset`.

    dataset = standardize_sharegpt(dataset)        # the "conversations" column, rewritten in place
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ALIASES = {
    "system": ("system",),
    "user": ("user", "human", "input"),
    "assistant": ("assistant", "gpt", "output", "model"),
    "tool": ("tool", "function_response", "observation", "ipython"),
}
# Message key pairs: (role key, content key). ShareGPT's and the standard one.
KEY_PAIRS = (("from", "value"), ("role", "content"))


def standardize_sharegpt(dataset: Any, conversation_key: str | None = None,
                         aliases: dict[str, Sequence[str]] | None = None) -> Any:
    """Every message of every conversation as `{"role", "content"}` with roles system / user / assistant / tool.

    Args:
        dataset: a list of rows (dicts) or a `datasets.Dataset`; the result is the same kind, other columns kept.
        conversation_key: the column holding the conversations; by default "conversations", else "messages", else
            the one column whose values are lists of messages.
        aliases: role names per standard role, replacing ALIASES (e.g. {"user": ["human"], "assistant": ["bot"]}).

    Raises ValueError naming the row and message for an unknown role or a message without role and content keys.
    """
    columns = _columns(dataset)
    key = conversation_key or _conversation_column(dataset, columns)
    if key not in columns:
        raise ValueError(f"no column {key!r} in the dataset (columns: {', '.join(columns)})")
    to_role = {alias: role for role, names in (aliases or ALIASES).items() for alias in names}

    if isinstance(dataset, list):
        return [{**row, key: _conversation(row[key], to_role, i)} for i, row in enumerate(dataset)]

    def convert(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        return {key: [_conversation(c, to_role, i) for c, i in zip(batch[key], indices)]}

    return dataset.map(convert, batched=True, with_indices=True, desc="Standardizing conversations")


def _columns(dataset: Any) -> list[str]:
    if isinstance(dataset, list):
        if not all(isinstance(row, dict) for row in dataset):
            raise TypeError("standardize_sharegpt takes a list of rows (dicts) or a datasets.Dataset")
        return list(dict.fromkeys(k for row in dataset[:1] for k in row))
    if hasattr(dataset, "column_names") and hasattr(dataset, "map"):
        return list(dataset.column_names)
    raise TypeError(f"standardize_sharegpt takes a list of rows (dicts) or a datasets.Dataset, not "
                    f"{type(dataset).__name__}")


def _conversation_column(dataset: Any, columns: list[str]) -> str:
    for name in ("conversations", "messages"):
        if name in columns:
            return name
    first = dataset[0] if len(dataset) else {}
    found = [c for c in columns if isinstance(first.get(c), list) and first[c] and isinstance(first[c][0], dict)]
    if len(found) != 1:
        raise ValueError(f"cannot tell which column holds the conversations (columns: {', '.join(columns)}); "
                         f"pass conversation_key=")
    return found[0]


def _conversation(messages: Any, to_role: dict[str, str], row: int) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise ValueError(f"row {row}: the conversation is a {type(messages).__name__}, not a list of messages")
    return [_message(m, to_role, row, j) for j, m in enumerate(messages)]


def _message(message: Any, to_role: dict[str, str], row: int, index: int) -> dict[str, Any]:
    where = f"row {row}, message {index}"
    if not isinstance(message, dict):
        raise ValueError(f"{where}: a message is a dict, not {type(message).__name__}")
    # A datasets column of messages has every key any message has, None where a message lacks it.
    keys = next(((r, c) for r, c in KEY_PAIRS if message.get(r) is not None and c in message), None)
    if keys is None:
        raise ValueError(f"{where}: a message needs 'from' and 'value' (ShareGPT) or 'role' and 'content'; it has "
                         f"{', '.join(message) or 'no keys'}")
    name = message[keys[0]]
    if name not in to_role:
        raise ValueError(f"{where}: unknown role {name!r}; known: {', '.join(to_role)} (pass aliases= to add it)")
    return {"role": to_role[name], "content": message[keys[1]]}
