"""Chat completions whose replies may call tools, written out as OpenAI writes them.

Each choice's text goes through the convention's parser (unsloth_core.tool_calls): whole, into `message.content`
(null when the reply is only calls) and `message.tool_calls`; streamed, text as `delta.content` as soon as it cannot
be the start of a call, and each call, once complete, as `delta.tool_calls` pieces: the first with the call's
`index`, `id`, `type` and function name (arguments ""), the next with its arguments. A reply that called and ended by
itself finishes with `tool_calls`. Logprobs ride on the next piece sent for their choice.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from pydantic import BaseModel

from app.schemas.completions import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatDelta,
    ChatFinish,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)
from app.services.completion_format import ChatFormatter, Choice, Header, chat_logprobs
from app.services.tool_use import ToolUse
from unsloth_core.tool_calls import Call, Content, Event

if TYPE_CHECKING:
    from unsloth_core.generate import Delta
    from unsloth_core.generate import TokenLogprob as EngineLogprob


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


def finish_reason(engine_finish: str | None, calls: int) -> ChatFinish:
    """`tool_calls` for a reply that called and ended by itself; one cut at max_tokens stays `length`."""
    if engine_finish == "stop":
        return "tool_calls" if calls else "stop"
    return "length"


class ToolCallFormatter(ChatFormatter):
    def __init__(self, header: Header, tools: ToolUse, n_choices: int) -> None:
        super().__init__(header)
        self.tools = tools
        self.parsers = [tools.parser() for _ in range(n_choices)]
        self.pending: list[list[EngineLogprob]] = [[] for _ in range(n_choices)]  # logprobs not yet sent

    def delta(self, d: Delta) -> list[BaseModel]:
        parser = self.parsers[d.index]
        events = parser.push(d.text) + (parser.finish() if d.finish_reason is not None else [])
        pieces: list[tuple[ChatDelta, ChatFinish | None]] = [(p, None) for e in events for p in _pieces(e)]
        if d.finish_reason is not None:
            pieces.append((ChatDelta(), finish_reason(d.finish_reason, parser.calls)))
        if self.header.logprobs is not None:
            self.pending[d.index] += d.logprobs or []
        out: list[BaseModel] = []
        for delta, finish in pieces:
            lps, self.pending[d.index] = self.pending[d.index], []
            out.append(ChatChunkChoice(index=d.index, delta=delta, logprobs=chat_logprobs(lps) if lps else None,
                                       finish_reason=finish))
        return out

    def choice(self, index: int, c: Choice) -> ChatChoice:
        parser = self.tools.parser()
        events = parser.push("".join(c.text)) + parser.finish()
        content = "".join(e.text for e in events if isinstance(e, Content))
        calls = [ToolCall(id=call_id(), function=FunctionCall(name=e.call.name, arguments=e.call.arguments))
                 for e in events if isinstance(e, Call)]
        message = AssistantMessage(content=content if content or not calls else None, tool_calls=calls or None)
        return ChatChoice(index=index, message=message, finish_reason=finish_reason(c.finish, len(calls)),
                          logprobs=chat_logprobs(c.logprobs) if self.header.logprobs is not None else None)


def _pieces(event: Event) -> list[ChatDelta]:
    if isinstance(event, Content):
        return [ChatDelta(content=event.text)]
    call = event.call
    return [ChatDelta(tool_calls=[ToolCallDelta(index=event.index, id=call_id(), type="function",
                                                function=FunctionCallDelta(name=call.name, arguments=""))]),
            ChatDelta(tool_calls=[ToolCallDelta(index=event.index,
                                                function=FunctionCallDelta(arguments=call.arguments))])]
