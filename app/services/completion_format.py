"""How a generation is written out: as a chat completion or a text completion, whole or as SSE chunks.

One formatter per kind, so the rest of the completions service never asks which kind it is serving: the chunk
before any token (chat: the assistant role; completion: the echoed prompt), a step's delta as chunk choices, the
usage chunk, and the whole response object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from app.schemas.completions import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)

if TYPE_CHECKING:
    from unsloth_core.generate import Delta
    from unsloth_core.generate import TokenLogprob as EngineLogprob

SYSTEM_FINGERPRINT = "fp_unsloth"
Finish = Literal["stop", "length"]


# JSON may hold U+0085, U+2028 and U+2029 raw inside strings (pydantic writes them so), but Python's str.splitlines,
# which httpx's `aiter_lines` uses to read SSE, ends a line at each: a model that emits one broke the client's stream
# ("Unterminated string", tests.load). Escaped, the event stays one line with the same meaning; outside strings JSON
# has none of them, so escaping is always safe.
_ONE_LINE = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


@dataclass
class Choice:
    """One choice collected whole (a non-streamed answer)."""

    text: list[str] = field(default_factory=list)
    n_tokens: int = 0
    logprobs: list[EngineLogprob] = field(default_factory=list)
    finish: str | None = None
    prompt_logprobs: list[EngineLogprob | None] | None = None  # an echoed, scored prompt's


@dataclass
class Header:
    """What every chunk and the response repeat."""

    id: str
    created: int
    model: str
    include_usage: bool
    logprobs: int | None  # None: the request asked for none


class Formatter:
    def __init__(self, header: Header, echo: Sequence[str] | None = None) -> None:
        self.header, self.echo = header, echo

    def sse(self, choices: Sequence[BaseModel], usage: Usage | None = None) -> str:
        return f"data: {self.chunk(choices, usage).model_dump_json(exclude_unset=True).translate(_ONE_LINE)}\n\n"

    def chunk(self, choices: Sequence[BaseModel], usage: Usage | None) -> BaseModel:
        raise NotImplementedError

    def opening(self, index: int) -> list[BaseModel]:
        """The chunk choices sent for choice `index` before any token."""
        raise NotImplementedError

    def delta(self, d: Delta) -> list[BaseModel]:
        raise NotImplementedError

    def response(self, choices: Sequence[Choice], usage: Usage) -> Completion | ChatCompletion:
        raise NotImplementedError

    def _fields(self, usage: Usage | None) -> dict[str, object]:
        h = self.header
        out: dict[str, object] = {"id": h.id, "created": h.created, "model": h.model,
                                  "system_fingerprint": SYSTEM_FINGERPRINT}
        if h.include_usage:  # null in every chunk but the last, as OpenAI sends it; absent when not asked for
            out["usage"] = usage
        return out


class ChatFormatter(Formatter):
    def chunk(self, choices: Sequence[BaseModel], usage: Usage | None) -> BaseModel:
        return ChatCompletionChunk(object="chat.completion.chunk", choices=list(choices),  # type: ignore[arg-type]
                                   **self._fields(usage))  # type: ignore[arg-type]

    def opening(self, index: int) -> list[BaseModel]:
        return [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""), logprobs=None,
                                finish_reason=None)]

    def delta(self, d: Delta) -> list[BaseModel]:
        out: list[BaseModel] = []
        if d.text or d.token_ids:
            lps = chat_logprobs(d.logprobs) if self.header.logprobs is not None and d.logprobs is not None else None
            out.append(ChatChunkChoice(index=d.index, delta=ChatDelta(content=d.text), logprobs=lps,
                                       finish_reason=None))
        if d.finish_reason is not None:
            out.append(ChatChunkChoice(index=d.index, delta=ChatDelta(), logprobs=None,
                                       finish_reason=d.finish_reason))
        return out

    def response(self, choices: Sequence[Choice], usage: Usage) -> ChatCompletion:
        h = self.header
        return ChatCompletion(id=h.id, created=h.created, model=h.model, system_fingerprint=SYSTEM_FINGERPRINT,
                              usage=usage, choices=[self.choice(i, c) for i, c in enumerate(choices)])

    def choice(self, index: int, c: Choice) -> ChatChoice:
        """One whole choice of the response."""
        return ChatChoice(index=index, message=AssistantMessage(content="".join(c.text)),
                          finish_reason=c.finish or "length",  # type: ignore[arg-type]
                          logprobs=chat_logprobs(c.logprobs) if self.header.logprobs is not None else None)


class CompletionFormatter(Formatter):
    """Text completions. With `echo`, each choice's prompt comes first; with echo and logprobs (`first_tokens`: each
    choice's first prompt token, which has no logprob), the prompt's tokens carry logprobs too, so its text is sent
    with the first event from the engine (the one holding them) rather than before it."""

    def __init__(self, header: Header, echo: Sequence[str] | None = None, n_choices: int = 0,
                 first_tokens: Sequence[str] | None = None) -> None:
        super().__init__(header, echo)
        self.first_tokens = first_tokens
        # Each choice's logprobs `text_offset` continues from the text already sent (the echoed prompt first).
        self.offsets = [len(e) for e in echo] if echo else [0] * n_choices

    def chunk(self, choices: Sequence[BaseModel], usage: Usage | None) -> BaseModel:
        return CompletionChunk(object="text_completion", choices=list(choices),  # type: ignore[arg-type]
                               **self._fields(usage))  # type: ignore[arg-type]

    def opening(self, index: int) -> list[BaseModel]:
        if not self.echo or self.first_tokens is not None:
            return []
        return [CompletionChunkChoice(index=index, text=self.echo[index], logprobs=None, finish_reason=None)]

    def delta(self, d: Delta) -> list[BaseModel]:
        out: list[BaseModel] = []
        if self.echo and self.first_tokens is not None and d.prompt_logprobs is not None:
            out.append(CompletionChunkChoice(index=d.index, text=self.echo[d.index], finish_reason=None,
                                             logprobs=self._prompt_logprobs(d.index, d.prompt_logprobs)))
        lps = d.logprobs if self.header.logprobs is not None else None
        logprobs = completion_logprobs(lps, self.offsets[d.index]) if lps is not None else None
        self.offsets[d.index] += len(d.text)
        out.append(CompletionChunkChoice(index=d.index, text=d.text, logprobs=logprobs, finish_reason=d.finish_reason))
        return out

    def response(self, choices: Sequence[Choice], usage: Usage) -> Completion:
        h = self.header
        return Completion(id=h.id, created=h.created, model=h.model, system_fingerprint=SYSTEM_FINGERPRINT,
                          usage=usage, choices=[
                              CompletionChoice(index=i, text=(self.echo[i] if self.echo else "") + "".join(c.text),
                                               finish_reason=c.finish or "length",  # type: ignore[arg-type]
                                               logprobs=self._logprobs(i, c) if h.logprobs is not None else None)
                              for i, c in enumerate(choices)])

    def _logprobs(self, index: int, c: Choice) -> CompletionLogprobs:
        completion = completion_logprobs(c.logprobs, self.offsets[index] if self.echo else 0)
        if self.first_tokens is None or c.prompt_logprobs is None:
            return completion
        prompt = self._prompt_logprobs(index, c.prompt_logprobs)
        return CompletionLogprobs(tokens=prompt.tokens + completion.tokens,
                                  token_logprobs=prompt.token_logprobs + completion.token_logprobs,
                                  top_logprobs=(prompt.top_logprobs or []) + (completion.top_logprobs or []),
                                  text_offset=prompt.text_offset + completion.text_offset)

    def _prompt_logprobs(self, index: int, items: Sequence[EngineLogprob | None]) -> CompletionLogprobs:
        """The prompt's tokens: the first with no logprob (null, as OpenAI and vLLM send it), then the engine's."""
        assert self.first_tokens is not None
        scored = [t for t in items if t is not None]
        tail = completion_logprobs(scored, len(self.first_tokens[index]))
        return CompletionLogprobs(tokens=[self.first_tokens[index], *tail.tokens],
                                  token_logprobs=[None, *tail.token_logprobs],
                                  top_logprobs=[None, *(tail.top_logprobs or [])], text_offset=[0, *tail.text_offset])


# ---- logprobs ----


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(items: Sequence[EngineLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(token=t.token, logprob=t.logprob, bytes=_utf8(t.token),
                     top_logprobs=[TopLogprob(token=text, logprob=lp, bytes=_utf8(text)) for _, text, lp in t.top])
        for t in items])


def completion_logprobs(items: Sequence[EngineLogprob], offset: int) -> CompletionLogprobs:
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(tokens=[t.token for t in items], token_logprobs=[t.logprob for t in items],
                              top_logprobs=[{text: lp for _, text, lp in t.top} for t in items], text_offset=offsets)
