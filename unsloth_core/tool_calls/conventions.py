"""The tool-call conventions chat templates are trained on, and which one a template follows.

- `hermes` (ChatML templates: SmolLM2, Qwen 2/2.5/3, Hermes 2/3): the reply may hold text, then each call as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one a line; tool results come back in one user turn,
  each as `<tool_response>\\n...\\n</tool_response>`. The tools are offered in the system prompt, in a `# Tools`
  block listing each tool's JSON inside `<tools></tools>`.
- `llama3` (Llama 3.1-3.3 Instruct, JSON tool calling): the whole reply is the call, `{"name": ..., "parameters":
  {...}}` (optionally after `<|python_tag|>`), several separated by `; `; results come back in `ipython` turns.
  The tools are offered as "Given the following functions, ..." with each tool's JSON.

The texts are the ones the families' own templates write (Qwen 2.5's and Llama 3.1's `chat_template`), so a
template without a tools section renders tools the way the family's models have seen them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Message = dict[str, Any]
Tool = dict[str, Any]  # OpenAI's {"type": "function", "function": {"name", "description", "parameters"}}


@dataclass(frozen=True)
class ToolCall:
    """One call as the API returns it: the function's name and its arguments as JSON text (an object)."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Convention:
    """How one template family writes calls, offers tools and reads results back.

    Args:
        name: `hermes` or `llama3`.
        open, close: the text around each call's JSON.
        separator: between two calls.
        arguments_key: the key the call's JSON holds the arguments under.
        tagged: calls are marked inside free text (hermes), rather than being the whole reply (llama3).
        tools_block: the instructions and tool list a system prompt gets, for templates with no tools section.
        result_turns: the turns a run of consecutive tool results becomes, for templates with no tool role.
    """

    name: str
    open: str
    close: str
    separator: str
    arguments_key: str
    tagged: bool
    tools_block: Callable[[Sequence[Tool]], str]
    result_turns: Callable[[Sequence[str]], list[Message]]

    def call_text(self, calls: Sequence[ToolCall]) -> str:
        """What a model of this family writes for `calls` (the text a training row's assistant turn holds)."""
        return self.separator.join(
            self.open + to_json({"name": c.name, self.arguments_key: json.loads(c.arguments)}) + self.close
            for c in calls)


def to_json(value: Any, indent: int | None = None) -> str:
    """JSON as chat templates' `tojson` writes it (", " and ": " separators, characters as they are)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _hermes_tools(tools: Sequence[Tool]) -> str:
    listed = "".join("\n" + to_json(t) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" + listed +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
            "<args-json-object>}\n</tool_call>")


def _hermes_results(contents: Sequence[str]) -> list[Message]:
    return [{"role": "user",
             "content": "\n".join(f"<tool_response>\n{c}\n</tool_response>" for c in contents)}]


def _llama3_tools(tools: Sequence[Tool]) -> str:
    listed = "\n\n".join(to_json(t, indent=4) for t in tools)
    return ("Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
            "\"parameters\": dictionary of argument name and its value}. Do not use variables.\n\n" + listed)


def _llama3_results(contents: Sequence[str]) -> list[Message]:
    return [{"role": "ipython", "content": c} for c in contents]


HERMES = Convention("hermes", "<tool_call>\n", "\n</tool_call>", "\n", "arguments", True, _hermes_tools,
                    _hermes_results)
LLAMA3 = Convention("llama3", "", "", "; ", "parameters", False, _llama3_tools, _llama3_results)
CONVENTIONS = {c.name: c for c in (HERMES, LLAMA3)}
PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's marker before a call; a special token, so usually absent from text


def detect_convention(chat_template: str | None) -> Convention | None:
    """The convention a chat template's family follows, read from the tokens it writes: `<tool_call>` or ChatML's
    `<|im_start|>` (hermes), Llama 3's `<|start_header_id|>` (llama3). None for any other family (Mistral's
    `[TOOL_CALLS]`, Gemma, Zephyr, Alpaca...), whose calls we cannot read."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template or "<|im_start|>" in chat_template:
        return HERMES
    if "<|start_header_id|>" in chat_template:
        return LLAMA3
    return None
