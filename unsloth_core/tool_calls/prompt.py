"""What a chat template is given when a conversation has tools: the messages and the `tools` argument.

A template that renders tools itself (Qwen's, Llama 3.1's own) gets them as transformers gives them: `tools=`, and
assistant `tool_calls` with their arguments as objects (OpenAI sends them as JSON text; the templates write
`arguments | tojson`). A template that does not (SmolLM2's ChatML, this package's `llama-3.1` format) would drop
them, so the conversation is rewritten in the family's convention instead: the tools block appended to the system
prompt (a system message added when there is none, which replaces a template's default system prompt), each
assistant's calls written after its text, and tool results as the convention's turns. For hermes this is the text
Qwen 2.5's template writes for the same conversation.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from typing import Any

from unsloth_core.errors import UnslothError
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_calls.conventions import Convention, Message, Tool, ToolCall, detect_convention

_PROBE = "unsloth_probe_function"


class ToolCallError(UnslothError, ValueError):
    """A message's tool call that cannot be rendered; `where` names it (`messages[2].tool_calls[0]...`)."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where


def renders_tools(tokenizer: Tokenizer) -> bool:
    """Whether the chat template writes a tool list and an assistant's calls (probed by rendering both)."""
    tool = {"type": "function", "function": {"name": _PROBE, "description": "",
                                             "parameters": {"type": "object", "properties": {}}}}
    called = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function", "function": {"name": _PROBE + "_called", "arguments": {}}}]}
    user = {"role": "user", "content": "hi"}
    try:
        offered = tokenizer.render_chat([user], tools=[tool])
        answered = tokenizer.render_chat([user, called, {"role": "tool", "tool_call_id": "call_0", "content": "1"}],
                                         tools=[tool])
    except Exception:  # a template that fails on tools (by raise_exception, a type error...) has none
        return False
    return _PROBE in offered and _PROBE + "_called" in answered


# Probing a template renders it twice; training asks once per row. Keyed by tokenizer, checked against its template
# (get_chat_template replaces a tokenizer's template in place).
_SUPPORT: weakref.WeakKeyDictionary[Tokenizer, tuple[str | None, Convention | None, bool]] = \
    weakref.WeakKeyDictionary()


def tool_support(tokenizer: Tokenizer) -> tuple[Convention | None, bool]:
    """(the convention the template's family follows, whether the template renders tools itself)."""
    template = tokenizer.chat_template
    cached = _SUPPORT.get(tokenizer)
    if cached is None or cached[0] != template:
        cached = (template, detect_convention(template), renders_tools(tokenizer))
        _SUPPORT[tokenizer] = cached
    return cached[1], cached[2]


def uses_tools(messages: Sequence[Message], tools: Sequence[Tool] | None) -> bool:
    """Whether a conversation offers tools, calls one or carries a tool's result."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def conversation_inputs(tokenizer: Tokenizer, messages: Sequence[Message], tools: Sequence[Tool] | None
                        ) -> tuple[list[Message], list[Tool] | None]:
    """(messages, tools) to give `tokenizer`'s template for a whole conversation with every tool offered: what
    serving gives it for the same conversation, so a training row renders as the served prompt plus the reply.

    Raises ToolCallError when the conversation uses tools and the template can neither render them nor follows a
    convention we can write them in (its tools and calls would be dropped silently)."""
    if not uses_tools(messages, tools):
        return list(messages), None
    convention, native = tool_support(tokenizer)
    if not native and convention is None:
        raise ToolCallError("the model's chat template neither renders tools nor follows a tool-call convention "
                            "this engine writes (ChatML/Hermes <tool_call> tags, Llama 3 JSON calls), so its tools "
                            "and calls would be dropped", "tools" if tools else "messages")
    return prompt_messages(messages, tools or [], convention, native)


def prompt_messages(messages: Sequence[Message], tools: Sequence[Tool], convention: Convention | None,
                    native: bool) -> tuple[list[Message], list[Tool] | None]:
    """(messages, tools) to render: as they are for a template that renders tools (`native`), else with the tools
    and calls written in `convention`'s text. Raises ToolCallError for arguments that are not a JSON object."""
    messages = [_with_argument_objects(m, i) for i, m in enumerate(messages)]
    if native or convention is None:
        return messages, list(tools) or None
    return _in_text(messages, tools, convention), None


def calls_of(message: Message) -> list[ToolCall]:
    """An assistant message's `tool_calls` (OpenAI's shape, arguments as text or as an object) as ToolCalls."""
    out = []
    for call in message.get("tool_calls") or []:
        function = call.get("function", call)
        arguments = function.get("arguments", {})
        out.append(ToolCall(str(function.get("name", "")),
                            arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)))
    return out


def _with_argument_objects(message: Message, i: int) -> Message:
    if not message.get("tool_calls"):
        return message
    if not isinstance(message["tool_calls"], list):
        raise ToolCallError("tool_calls must be a list of calls", f"messages[{i}].tool_calls")
    calls = []
    for j, call in enumerate(message["tool_calls"]):
        function = call.get("function") if isinstance(call, dict) else None
        where = f"messages[{i}].tool_calls[{j}].function"
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolCallError("a tool call needs a function with a name", where)
        calls.append({**call, "function": {**function, "arguments": _arguments(function.get("arguments"), where)}})
    return {**message, "tool_calls": calls}


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise ToolCallError(f"the arguments are not valid JSON: {e}", where + ".arguments") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ToolCallError("the arguments must be a JSON object", where + ".arguments")
    return value


def _in_text(messages: list[Message], tools: Sequence[Tool], convention: Convention) -> list[Message]:
    out: list[Message] = []
    results: list[str] = []
    for m in messages:
        if m.get("role") == "tool":
            results.append(str(m.get("content") or ""))
            continue
        out += convention.result_turns(results) if results else []
        results = []
        calls = calls_of(m) if m.get("role") == "assistant" else []
        if calls:
            text = str(m.get("content") or "")
            written = convention.call_text(calls)
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = f"{text}\n{written}" if text else written
        out.append(m)
    out += convention.result_turns(results) if results else []
    if tools:
        out = _with_system(out, convention.tools_block(tools))
    return out


def _with_system(messages: list[Message], block: str) -> list[Message]:
    if messages and messages[0].get("role") == "system":
        system = str(messages[0].get("content") or "")
        return [{**messages[0], "content": f"{system}\n\n{block}" if system else block}, *messages[1:]]
    return [{"role": "system", "content": block}, *messages]
