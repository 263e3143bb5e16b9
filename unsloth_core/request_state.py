"""One request's state in the generation engine, and what it hands out: deltas as it goes, a Completion at its end.

`RowState` turns a row's sampled tokens into text: EOS and stop tokens end it, stop strings (which may straddle
tokens) cut it, and text that could still begin a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from unsloth_core.errors import ContextLengthError
from unsloth_core.sampling import SamplingParams
from unsloth_core.tokenizer import StreamDecoder, Tokenizer

FinishReason = Literal["stop", "length"]
Prompt = str | Sequence[int]


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob), most likely first


@dataclass
class Delta:
    """What one row produced since the last event: text (possibly empty while a character or a possible stop
    string is held back), the new tokens, and on the last event of the row its finish reason."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # the EOS / stop token that ended the row (not in token_ids)
    # On the row's first event, when its params ask for prompt_logprobs: one per prompt token (None for the first)
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RowState:
    """Host-side state of one sequence: its text so far, stop strings, and what has been emitted."""

    def __init__(self, index: int, tokenizer: Tokenizer | None, params: SamplingParams, stop_ids: set[int]) -> None:
        self.index, self.params, self.stop_ids = index, params, stop_ids
        # Without a tokenizer (token ids in, token ids out) there is no text and no stop strings.
        self.decoder = StreamDecoder(tokenizer, params.skip_special_tokens) if tokenizer is not None else None
        self.text = ""  # decoded so far
        self.emitted = 0  # characters of self.text already handed out
        self.token_ids: list[int] = []
        self.finish: FinishReason | None = None
        self.stop_token_id: int | None = None

    def push(self, token_id: int) -> None:
        if token_id in self.stop_ids:
            self.stop_token_id = token_id
            self.text += self.decoder.flush() if self.decoder else ""
            self.finish = "stop"  # an EOS / stop token ends the text and is not part of it
            return
        self.token_ids.append(token_id)
        self.text += self.decoder.push(token_id) if self.decoder else ""
        if self._cut_at_stop_string():
            return
        if len(self.token_ids) >= self.params.max_new_tokens:
            self.text += self.decoder.flush() if self.decoder else ""
            self._cut_at_stop_string()
            self.finish = self.finish or "length"

    def end(self) -> None:
        """Finish now, as a stop: the text so far is all of it (a grammar that is complete allows nothing more)."""
        if self.finish is None:
            self.text += self.decoder.flush() if self.decoder else ""
            self.finish = "stop"

    def _cut_at_stop_string(self) -> bool:
        # A stop string may straddle tokens; search from just before the unemitted text.
        start = max(0, self.emitted - max((len(s) for s in self.params.stop), default=0))
        hits = [i for s in self.params.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish = "stop"
        return bool(hits)

    def take(self) -> str:
        """Text safe to hand out: everything, once finished; else all but a tail that could begin a stop string."""
        end = len(self.text)
        if self.finish is None:
            for s in self.params.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.emitted)
        out, self.emitted = self.text[self.emitted:end], end
        return out


def check_context(n_prompt: int, max_new_tokens: int, max_seq_length: int) -> None:
    """Refuse a request that cannot fit the model's context, with numbers a user can act on."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty")
    if n_prompt + max_new_tokens > max_seq_length:
        raise ContextLengthError(
            f"the prompt is {n_prompt} tokens and {max_new_tokens} new tokens were asked for, "
            f"{n_prompt + max_new_tokens} in all; this model's context is {max_seq_length} tokens. "
            f"Shorten the prompt or ask for fewer tokens."
        )


def step_logprobs(logits: Tensor, chosen: Tensor, top: int | None) -> Tensor | None:
    """(B, 1 + 2*top): the chosen token's logprob, then the top ids and their logprobs (raw distribution)."""
    if top is None:
        return None
    lp = logits.log_softmax(-1)
    parts = [lp.gather(-1, chosen[:, None])]
    if top:
        vals, idx = lp.topk(top, dim=-1)
        parts += [idx.to(lp.dtype), vals]
    return torch.cat(parts, dim=-1)


def prompt_token_logprobs(lm_head: Callable[[Tensor], Tensor], hidden: Tensor, targets: Sequence[int],
                          top: int, tokenizer: Tokenizer | None, piece: int = 256) -> list[TokenLogprob]:
    """Each target token's logprob given the hidden state (T, C) before it, and the `top` most likely there: a
    prompt scored from its prefill's hidden states. The head runs `piece` positions at a time, so scoring a long
    prompt holds (piece, vocab) logits, never (T, vocab)."""
    out: list[TokenLogprob] = []
    for start in range(0, len(targets), piece):
        chosen = torch.tensor(targets[start:start + piece], device=hidden.device)
        logits = lm_head(hidden[start:start + len(chosen)]).float()
        values = step_logprobs(logits, chosen, top)
        assert values is not None
        out += [token_logprob(tokenizer, tok, row, top) for tok, row in zip(chosen.tolist(), values.tolist())]
    return out


def token_logprob(tokenizer: Tokenizer | None, tok: int, values: list[float], top: int) -> TokenLogprob:
    """One row of `step_logprobs`, read back on the host, as a TokenLogprob."""
    def text(i: int) -> str:
        return tokenizer.decode([i]) if tokenizer is not None else ""

    ids = [int(i) for i in values[1 : 1 + top]]
    return TokenLogprob(tok, text(tok), values[0], [(i, text(i), v) for i, v in zip(ids, values[1 + top:])])


def encode_prompt(tokenizer: Tokenizer | None, prompt: Prompt) -> list[int]:
    """A prompt's token ids: given as ids, or text encoded with the tokenizer."""
    if not isinstance(prompt, str):
        return list(prompt)
    if tokenizer is None:
        raise ValueError("text prompts need a tokenizer; give token ids")
    return tokenizer.encode(prompt)
