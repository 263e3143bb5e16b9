"""`train_on_responses_only`: labels (-100 elsewhere) on the assistant's replies only, as Unsloth's notebooks ask:

    trainer = train_on_responses_only(trainer,
        instruction_part="<|start_header_id|>user<|end_header_id|>\\n\\n",
        response_part="<|start_header_id|>assistant<|end_header_id|>\\n\\n")

A reply is the text after each `response_part` up to the next `instruction_part` (or the end): its end-of-turn
token is trained, the next turn's header is not. The parts are found in the text, not as token sequences: each
example's ids are decoded and every token is given its characters, so a header that tokenizes differently next to
its neighbours (or is several tokens, when the tokenizer lacks the format's special tokens) is still found. A token
is labelled when any of its characters is in a reply, as the engine's own chat masking does (data/sft.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from unsloth_core.data.sft import IGNORE_INDEX
from unsloth_core.tokenizer import StreamDecoder, Tokenizer

Span = tuple[int, int]


def train_on_responses_only(trainer: Any, instruction_part: str, response_part: str,
                            num_proc: int | None = None) -> Any:
    """Set `labels` on the trainer's tokenized train (and eval) dataset so that only replies are trained; returns
    the trainer. `num_proc` is passed to `datasets.Dataset.map`.

    Raises ValueError when no example contains `response_part` (a part that does not match the chat template);
    warns when some examples have no reply left (truncated before it, or none in the conversation)."""
    if not response_part or not instruction_part:
        raise ValueError("train_on_responses_only needs instruction_part and response_part: the text that opens a "
                         "user turn and an assistant turn in your chat template")
    tokenizer = getattr(trainer, "processing_class", None)
    if not isinstance(tokenizer, Tokenizer) or not hasattr(trainer, "train_dataset"):
        raise TypeError("train_on_responses_only takes an unsloth_core SFTTrainer (its datasets are tokenized when "
                        "it is created)")

    def label_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return {"labels": response_labels(tokenizer, batch["input_ids"], instruction_part, response_part)}

    trainer.train_dataset = _with_labels(trainer.train_dataset, label_batch, num_proc)
    _check(trainer.train_dataset, response_part, tokenizer)
    if getattr(trainer, "eval_dataset", None) is not None:
        trainer.eval_dataset = _with_labels(trainer.eval_dataset, label_batch, num_proc)
    return trainer


def response_labels(tokenizer: Tokenizer, rows: Sequence[Sequence[int]], instruction_part: str,
                    response_part: str) -> list[list[int]]:
    """For each row of ids: the id where the token is part of a reply, IGNORE_INDEX elsewhere."""
    out = []
    for ids, (text, spans) in zip(rows, token_spans(tokenizer, rows)):
        replies = reply_spans(text, instruction_part, response_part)
        out.append([i if any(s < end and start < e for s, e in replies) else IGNORE_INDEX
                    for i, (start, end) in zip(ids, spans)])
    return out


def reply_spans(text: str, instruction_part: str, response_part: str) -> list[Span]:
    """[start, end) of each reply: after a `response_part`, up to the next `instruction_part` or the text's end."""
    spans, pos = [], 0
    while (found := text.find(response_part, pos)) >= 0:
        start = found + len(response_part)
        end = text.find(instruction_part, start)
        end = len(text) if end < 0 else end
        spans.append((start, end))
        pos = max(end, start)
    return spans


def token_spans(tokenizer: Tokenizer, rows: Sequence[Sequence[int]]) -> list[tuple[str, list[Span]]]:
    """Each row's text (special tokens written out) and each token's [start, end) in it.

    Re-encoding the decoded text gives the offsets when it gives back the same ids (the usual case); otherwise the
    ids are decoded one at a time, keeping the characters a token completes (a multi-byte character split across
    tokens belongs to the token that ends it)."""
    rows = [list(r) for r in rows]
    texts = tokenizer.backend.decode_batch(rows, skip_special_tokens=False)
    encoded = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
    out: list[tuple[str, list[Span]]] = []
    for ids, text, enc in zip(rows, texts, encoded):
        if list(enc.ids) == ids:
            out.append((text, [(start, end) for start, end in enc.offsets]))
            continue
        decoder = StreamDecoder(tokenizer, skip_special_tokens=False)
        spans: list[Span] = []
        pieces: list[str] = []
        pos = 0
        for i in ids:
            piece = decoder.push(i)
            pieces.append(piece)
            spans.append((pos, pos + len(piece)))
            pos += len(piece)
        out.append(("".join(pieces), spans))
    return out


def _with_labels(dataset: Any, label_batch: Any, num_proc: int | None) -> Any:
    if isinstance(dataset, list):
        labels = label_batch({"input_ids": [row["input_ids"] for row in dataset]})["labels"]
        return [{**row, "labels": row_labels} for row, row_labels in zip(dataset, labels)]
    return dataset.map(label_batch, batched=True, num_proc=num_proc, desc="Masking everything but the replies")


def _check(dataset: Any, response_part: str, tokenizer: Tokenizer) -> None:
    rows = dataset if isinstance(dataset, list) else dataset.select_columns(["input_ids", "labels"])
    empty = [i for i, row in enumerate(rows) if all(x == IGNORE_INDEX for x in row["labels"])]
    if len(empty) == len(dataset):
        sample = tokenizer.decode(rows[0]["input_ids"])[:300] if len(dataset) else ""
        raise ValueError(f"response_part {response_part!r} is in none of the {len(dataset)} examples, so nothing "
                         f"would be trained; check it against your chat template (example 0 reads {sample!r})")
    if empty:
        warnings.warn(f"{len(empty)} of {len(dataset)} examples have no reply to train on (first: example "
                      f"{empty[0]}); they add nothing to the loss", stacklevel=3)
