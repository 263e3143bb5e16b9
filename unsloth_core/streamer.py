"""`TextStreamer`, as transformers' (`model.generate(..., streamer=TextStreamer(tokenizer))` prints the text as it
is generated). `model.generate` calls `put` with the prompt's ids first, then with each new token, and `end` once;
transformers' own streamers (anything with `put` and `end`) are driven the same way.
"""

from __future__ import annotations

from typing import Any

import torch


class TextStreamer:
    """Prints decoded text to stdout as tokens arrive, and a newline at the end.

    `skip_prompt`: do not print the prompt. `decode_kwargs` go to `tokenizer.decode` (`skip_special_tokens=True`).
    Text is printed once it no longer ends in an incomplete UTF-8 character; the ids are decoded together (a
    SentencePiece token's leading space depends on what precedes it), and after a newline only the last token is
    kept as context, so the decoding stays short."""

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        self.token_cache: list[int] = []
        self.print_len = 0  # characters of the cache's text already printed
        self.next_tokens_are_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.size(0) > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        ids = value.reshape(-1).tolist()
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(ids)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd"):
            return  # the last token ends mid-character: wait for the rest of it
        printable, self.print_len = text[self.print_len:], len(text)
        if text.endswith("\n"):
            self.token_cache = self.token_cache[-1:]
            self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        self.on_finalized_text(printable)

    def end(self) -> None:
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs) if self.token_cache else ""
        printable = text[self.print_len:]
        self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Where the text goes: stdout (override to send it elsewhere, as in transformers)."""
        print(text, flush=True, end=None if stream_end else "")
