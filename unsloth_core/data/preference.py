"""Preference pairs -> (prompt ids, chosen ids, rejected ids) for DPO.

The prompt is the conversation rendered with the generation prompt (it ends with the assistant header, as at
inference); each reply is what the template renders after it, up to and including the end-of-turn token. Prompt and
replies are tokenized separately because that is how the model meets them: it is given the prompt's tokens and
produces the reply's.

Truncation, when prompt + longer reply exceed max_seq_length: the prompt loses tokens from its start (the latest turn
and the assistant header matter most) but keeps at least half the budget when it needs it; the replies are then cut at
the end to fit what is left. Replies are cut, never dropped, so both sides of a pair still compare.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from unsloth_core.data.chat import end_of_reply, render
from unsloth_core.data.examples import Message, PreferenceExample
from unsloth_core.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenizedPreference:
    """One DPO pair: `prompt_ids + chosen_ids` and `prompt_ids + rejected_ids` are the two sequences, each at most
    max_seq_length long; `truncated` says whether anything was cut."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False

    def __iter__(self) -> Iterator[list[int]]:
        """Lets callers unpack `prompt, chosen, rejected = tokenize_preference(...)`."""
        return iter((self.prompt_ids, self.chosen_ids, self.rejected_ids))


def tokenize_preference(example: PreferenceExample, tokenizer: Tokenizer,
                        max_seq_length: int | None) -> TokenizedPreference:
    """Raises DataFormatError when the chat template refuses the conversation."""
    prompt_text = render(tokenizer, example.prompt, example.tools, add_generation_prompt=True)
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    chosen = _reply_ids(tokenizer, example, example.chosen, prompt_text)
    rejected = _reply_ids(tokenizer, example, example.rejected, prompt_text)
    longest = max(len(chosen), len(rejected))
    if max_seq_length is None or len(prompt) + longest <= max_seq_length:
        return TokenizedPreference(prompt, chosen, rejected)
    keep = max(max_seq_length - longest, max_seq_length // 2)
    prompt = prompt[-keep:] if len(prompt) > keep else prompt
    room = max_seq_length - len(prompt)
    return TokenizedPreference(prompt, chosen[:room], rejected[:room], truncated=True)


def _reply_ids(tokenizer: Tokenizer, example: PreferenceExample, reply: Message, prompt_text: str) -> list[int]:
    full = render(tokenizer, (*example.prompt, reply), example.tools)
    # A template whose rendering of the prompt changes once a reply follows: take the reply and end the turn.
    fallback = reply.content + (tokenizer.eos_token or "")
    text = full[len(prompt_text):] if full.startswith(prompt_text) else fallback
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:end_of_reply(ids, 0, len(ids), tokenizer.eos_token_ids)]
