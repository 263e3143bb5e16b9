"""Where each turn of a conversation lies in the text the model's chat template renders.

Nothing here knows ChatML or any other template. A turn's characters are found by rendering prefixes of the
conversation and diffing: turn i spans `render(messages[:i])` .. `render(messages[:i + 1])`, and an assistant turn's
reply starts after `render(messages[:i], add_generation_prompt=True)`, which is the header the model is given at
inference. Templates that re-render history differently as the conversation grows (some strip earlier reasoning)
break the prefix property; for those we fall back to finding the reply's text in the full rendering.

A conversation with tools is first given the template the way serving gives it (`tool_calls.conversation_inputs`):
arguments as objects for a template that renders tools, the family's tool-call text otherwise. So a trained model sees
its tools and writes its calls exactly as it will be prompted and parsed when served.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import jinja2

from unsloth_core.data.examples import Message, Role
from unsloth_core.errors import DataFormatError
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_calls import ToolCallError, conversation_inputs, uses_tools

_TRAINABLE = "__unsloth_trainable__"  # rides along a message through the rewrite; never reaches the template


@dataclass(frozen=True)
class TurnSpan:
    """Character ranges of one message in the rendered conversation.

    `start`..`end` is the whole turn (header, content, end-of-turn, separator); `reply_start`..`end` is what the model
    would generate for an assistant turn (content, end-of-turn, and whatever separator the template adds after it).
    """

    start: int
    reply_start: int
    end: int


def template_conversation(tokenizer: Tokenizer, messages: Sequence[Message], tools: list[dict[str, Any]] | None
                          ) -> tuple[tuple[Message, ...], list[dict[str, Any]] | None]:
    """(messages, tools) as the template is to be given them. A conversation without tools comes back as it is; one
    with tools may come back with more or fewer messages (a system prompt holding the tools, tool results merged into
    one turn), each assistant turn keeping whether it is trained on."""
    dicts = [m.to_template() for m in messages]
    if not uses_tools(dicts, tools):
        return tuple(messages), tools or None
    try:
        rewritten, template_tools = conversation_inputs(
            tokenizer, [{**d, _TRAINABLE: m.trainable} for d, m in zip(dicts, messages)], tools)
    except ToolCallError as e:
        raise DataFormatError(f"{e.where}: {e}") from None
    return tuple(_message(d) for d in rewritten), template_tools


def _message(d: dict[str, Any]) -> Message:
    extra = {k: v for k, v in d.items() if k not in ("role", "content", _TRAINABLE)}
    return Message(cast(Role, d["role"]), str(d.get("content") or ""), bool(d.get(_TRAINABLE, False)), extra)


def render(tokenizer: Tokenizer, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None,
           add_generation_prompt: bool = False) -> str:
    """The model's chat template applied to `messages` (tools as serving gives them); a template that refuses them
    is a data error."""
    messages, tools = template_conversation(tokenizer, messages, tools)
    return _render(tokenizer, messages, tools, add_generation_prompt)


def _render(tokenizer: Tokenizer, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
            add_generation_prompt: bool = False) -> str:
    kwargs = {"tools": tools} if tools else {}
    try:
        return tokenizer.render_chat([m.to_template() for m in messages], add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise DataFormatError(f"the model's chat template refused this conversation: {e}") from None


def turn_spans(tokenizer: Tokenizer, messages: Sequence[Message], tools: list[dict[str, Any]] | None = None
               ) -> tuple[str, tuple[Message, ...], list[TurnSpan]]:
    """(the rendered conversation, the messages the template was given, one span for each of them)."""
    messages, tools = template_conversation(tokenizer, messages, tools)
    full = _render(tokenizer, messages, tools)
    try:
        return full, messages, _spans_by_prefix(tokenizer, messages, tools, full)
    except (_NotAPrefix, DataFormatError):
        # A template may also refuse a prefix it never sees alone (e.g. one that must end with a user turn).
        return full, messages, _spans_by_search(tokenizer, messages, full)


class _NotAPrefix(Exception):
    pass


def _spans_by_prefix(tokenizer: Tokenizer, messages: Sequence[Message], tools: list[dict[str, Any]] | None,
                     full: str) -> list[TurnSpan]:
    spans = []
    start = 0  # the first turn also owns whatever the template puts before it (BOS, a default system prompt)
    for i, message in enumerate(messages):
        end_text = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], tools)
        if not full.startswith(end_text):
            raise _NotAPrefix
        reply_start = start
        if message.role == "assistant":
            header = _render(tokenizer, messages[:i], tools, add_generation_prompt=True)
            if not full.startswith(header) or not start <= len(header) <= len(end_text):
                raise _NotAPrefix
            reply_start = len(header)
        spans.append(TurnSpan(start, reply_start, len(end_text)))
        start = len(end_text)
    return spans


def _spans_by_search(tokenizer: Tokenizer, messages: Sequence[Message], full: str) -> list[TurnSpan]:
    """Fallback: each message's content, found in order; an assistant reply runs up to the next message's content.

    Turn boundaries here are approximate (headers land in the previous turn), but an assistant reply still covers its
    content and the end-of-turn text right after it, which is what the loss needs.
    """
    found = []
    pos = 0
    for i, message in enumerate(messages):
        at = full.find(message.content, pos)
        if at < 0:
            raise DataFormatError(f"cannot find message {i} ({message.role}) in the text the chat template renders; "
                                  "the template rewrites it")
        found.append(at)
        pos = at + len(message.content)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, at in enumerate(found):
        nxt = found[i + 1] if i + 1 < len(found) else len(full)
        end = at + len(messages[i].content)
        # The reply ends at the end-of-turn token when the template puts one right after the content.
        close = full.find(eos, end, nxt) if eos else -1
        end = close + len(eos) if close >= 0 else end
        spans.append(TurnSpan(found[i - 1] + len(messages[i - 1].content) if i else 0, at, end))
    return spans


def end_of_reply(ids: Sequence[int], start: int, stop: int, eos_ids: Sequence[int]) -> int:
    """Index just past the last end-of-turn token in ids[start:stop], or `stop` when there is none.

    Templates put a separator after the end-of-turn token (ChatML's newline). The model stops generating at the
    end-of-turn token, so it should learn to emit that token and nothing after it.
    """
    for i in range(stop - 1, start - 1, -1):
        if ids[i] in eos_ids:
            return i + 1
    return stop
