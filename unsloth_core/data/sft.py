"""Supervised fine-tuning examples -> token ids and labels (-100 where there is no loss).

Labels are aligned with `input_ids` (label i is token i); the model shifts them, as transformers does.

- chat: rendered with the model's own chat template. Loss on the trainable assistant turns only: the reply's content
  and its end-of-turn token (`<|im_end|>` in ChatML), not the `<|im_start|>assistant\\n` header the model is given at
  inference, and not the separator after the end-of-turn token. `train_on_inputs` puts loss on everything except the
  assistant turns marked `weight: 0`.
- prompt/completion: no template; loss on the completion and an appended EOS.
- text: loss on every token, plus an appended EOS.

The whole text is tokenized at once and labels are assigned by character offsets, so token boundaries are exactly
the ones inference sees (tokenizing segments separately can merge differently at the seams).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from unsloth_core.data.chat import end_of_reply, turn_spans
from unsloth_core.data.examples import ChatExample, CompletionExample, SFTExample, TextExample
from unsloth_core.tokenizer import Tokenizer

# The label that gets no loss. Same value as unsloth_core.kernels.IGNORE_INDEX, kept here so that validating a file
# (which the API process does) never imports torch.
IGNORE_INDEX = -100

Span = tuple[int, int]  # [start, end) in characters


@dataclass(frozen=True)
class TokenizedExample:
    """One training sequence.

    Args:
        input_ids: token ids, at most max_seq_length of them.
        labels: same length; the token id where there is loss, IGNORE_INDEX elsewhere.
        truncated: whether the example was cut to max_seq_length.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        """Tokens the loss is computed on. The first token is never predicted, so its label never counts."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def tokenize_sft(example: SFTExample, tokenizer: Tokenizer, max_seq_length: int | None,
                 train_on_inputs: bool = False) -> TokenizedExample:
    """Token ids and labels for one SFT example, cut to `max_seq_length` (keeping the start) when longer.

    Raises DataFormatError when the chat template refuses the conversation.
    """
    eos = tokenizer.eos_token_id
    if isinstance(example, TextExample):
        ids, labels, _ = _label_spans(tokenizer, example.text, [(0, len(example.text))], add_special_tokens=True)
    elif isinstance(example, CompletionExample):
        text = example.prompt + example.completion
        start = 0 if train_on_inputs else len(example.prompt)
        ids, labels, _ = _label_spans(tokenizer, text, [(start, len(text))], add_special_tokens=True)
    else:
        ids, labels = _tokenize_chat(example, tokenizer, train_on_inputs)
        eos = None  # the template ends each turn itself
    if eos is not None:
        ids, labels = [*ids, eos], [*labels, eos]
    if max_seq_length is not None and len(ids) > max_seq_length:
        return TokenizedExample(ids[:max_seq_length], labels[:max_seq_length], truncated=True)
    return TokenizedExample(ids, labels)


def _tokenize_chat(example: ChatExample, tokenizer: Tokenizer, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    text, messages, turns = turn_spans(tokenizer, example.messages, example.tools)
    if train_on_inputs:
        # Everything but the turns the file marked weight 0 (their headers too: the turn is excluded as a whole).
        skipped = [(t.start, t.end) for m, t in zip(messages, turns) if m.role == "assistant" and not m.trainable]
        ids, labels, _ = _label_spans(tokenizer, text, _complement(skipped, len(text)), add_special_tokens=False)
        return ids, labels
    replies = [(t.reply_start, t.end) for m, t in zip(messages, turns) if m.trainable]
    ids, labels, runs = _label_spans(tokenizer, text, replies, add_special_tokens=False)
    eos_ids = tokenizer.eos_token_ids
    for first, stop in runs:
        cut = end_of_reply(ids, first, stop, eos_ids)
        labels[cut:stop] = [IGNORE_INDEX] * (stop - cut)
    return ids, labels


def _label_spans(tokenizer: Tokenizer, text: str, spans: Sequence[Span],
                 add_special_tokens: bool) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Tokenize `text`; a token is labelled when any of its characters lies in one of the sorted, disjoint `spans`.

    Returns (ids, labels, the [first, stop) token range of each span).
    """
    encoding = tokenizer.backend.encode(text, add_special_tokens=add_special_tokens)
    ids = list(encoding.ids)
    labels = [IGNORE_INDEX] * len(ids)
    runs = []
    for span_start, span_end in spans:
        # Zero-width tokens (a BOS the post-processor adds) are never in a span.
        inside = [i for i, (start, end) in enumerate(encoding.offsets)
                  if start < span_end and end > span_start and end > start]
        for i in inside:
            labels[i] = ids[i]
        if inside:
            runs.append((inside[0], inside[-1] + 1))
    return ids, labels, runs


def _complement(spans: Sequence[Span], length: int) -> list[Span]:
    out, pos = [], 0
    for start, end in sorted(spans):
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < length:
        out.append((pos, length))
    return out
