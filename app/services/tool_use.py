"""Tools on chat completions: a request's `tools`, `tool_choice` and `parallel_tool_calls` checked, resolved against
the model's chat template (the convention its family writes calls in), rendered into the prompt, and the grammar a
forced call is held to.

- `tool_choice` `auto` (the default with tools): the tools are offered and the reply is read for calls.
- `none`: no tools offered, nothing read as a call (earlier calls and results in the messages still render).
- `required`, or a named function: the tools (only the named one) are offered and decoding is held to a grammar, so
  the reply is a call (one, for a named function or `parallel_tool_calls: false`) whose arguments are an instance
  of that function's parameters schema.
- `parallel_tool_calls: false`: at most one call is read from a reply; any later one stays in its text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.core.errors import bad_request
from app.schemas.completions import ChatCompletionRequest, NamedToolChoice

ANSWER_SCHEMA = "response_format.json_schema.schema"

if TYPE_CHECKING:
    from unsloth_core.constrained import Constraint
    from unsloth_core.tokenizer import Tokenizer
    from unsloth_core.tool_calls import Convention, Tool, ToolCallParser


@dataclass(frozen=True)
class ToolUse:
    """What a chat request asks of tools, against one model's template.

    Args:
        convention: how the template's family writes calls; None for a family we do not know (then no tools may be
            offered, and earlier calls in the messages reach the template as they are).
        native: the template renders tools and calls itself; else they are written into the messages.
        tools: every tool the request sent (OpenAI's dicts), in order.
        offered: the tools the model is told of: all of them, the named one, or none (`tool_choice: none`).
        forced: the reply must be a call of an offered tool.
        parallel: a reply may hold more than one call.
    """

    convention: Convention | None
    native: bool
    tools: list[Tool]
    offered: list[Tool]
    forced: bool
    parallel: bool

    def parser(self) -> ToolCallParser:
        from unsloth_core.tool_calls import tool_call_parser

        assert self.convention is not None and self.offered
        return tool_call_parser(self.convention, {t["function"]["name"] for t in self.offered}, self.parallel)

    @property
    def reads_calls(self) -> bool:
        return bool(self.offered)


def check_request(body: ChatCompletionRequest) -> None:
    """What the schema cannot say: names unique, a forced choice naming an offered tool."""
    names = [t.function.name for t in body.tools or []]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise bad_request(f"Function names must be unique; {duplicate!r} is given twice.", param="tools")
    choice = body.tool_choice
    if choice not in (None, "none", "auto") and not names:
        raise bad_request("tool_choice other than none or auto needs tools.", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise bad_request(f"tool_choice names the function {choice.function.name!r}, which is not in tools.",
                          param="tool_choice.function.name")


def resolve(body: ChatCompletionRequest, tokenizer: Tokenizer) -> ToolUse | None:
    """None when the request has no tools and its messages no calls; a 400 naming `tools` when tools are offered to
    a model whose template follows no convention we can read calls in."""
    from unsloth_core.tool_calls import detect_convention, renders_tools

    history = any(m.tool_calls or m.role == "tool" for m in body.messages)
    if not body.tools and not history:
        return None
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice or ("auto" if tools else "none")
    offered = _offered(tools, choice)
    convention = detect_convention(tokenizer.chat_template)
    if convention is None and offered:
        raise bad_request("This model's chat template follows no tool-call convention this server reads (ChatML/"
                          "Hermes <tool_call> tags, or Llama 3 JSON calls), so it cannot be given tools.",
                          param="tools", code="unsupported_tools")
    return ToolUse(convention, renders_tools(tokenizer), tools, offered,
                   forced=choice not in ("auto", "none"),
                   parallel=body.parallel_tool_calls is not False and not isinstance(choice, NamedToolChoice))


def _offered(tools: list[Tool], choice: Any) -> list[Tool]:
    if choice == "none":
        return []
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t["function"]["name"] == choice.function.name]
    return tools


def prompt_inputs(use: ToolUse | None, messages: list[dict[str, Any]]
                  ) -> tuple[list[dict[str, Any]], list[Tool] | None]:
    """(messages, tools) for the chat template; a call whose arguments are not a JSON object is a 400 naming it."""
    from unsloth_core.tool_calls import ToolCallError, prompt_messages

    if use is None:
        return messages, None
    try:
        return prompt_messages(messages, use.offered, use.convention, use.native)
    except ToolCallError as e:
        raise bad_request(f"This tool call cannot be rendered: {e}", param=e.where) from None


def output_constraint(use: ToolUse | None, answer: Constraint | None) -> Constraint | None:
    """The grammar the reply follows: a call when forced; with tools offered and a response format, a call or an
    answer in that format; else the response format's alone."""
    from unsloth_core.tool_calls import tool_call_constraint

    if use is None or not use.offered or (answer is None and not use.forced):
        return answer
    assert use.convention is not None
    return tool_call_constraint(use.convention, use.offered, use.parallel, None if use.forced else answer)


def grammar_param(use: ToolUse | None, compiles: Callable[[Constraint], bool]) -> str:
    """The field to name when a tool grammar does not compile: the first offered tool whose call schema does not
    compile alone, else the response format's schema (the answer half of a call-or-answer grammar)."""
    from unsloth_core.constrained import Constraint
    from unsloth_core.tool_calls import call_schema

    if use is None or use.convention is None:
        return ANSWER_SCHEMA
    for tool in use.offered:
        function = tool["function"]
        schema = call_schema(function["name"], function.get("parameters"), use.convention.arguments_key)
        if not compiles(Constraint.json_schema(schema)):
            return f"tools[{use.tools.index(tool)}].function.parameters"
    return ANSWER_SCHEMA
