"""The grammar that makes a reply a tool call (`tool_choice` required, or one named function): the convention's
text around a JSON object whose `name` is an offered function's and whose arguments are an instance of that
function's parameters schema, as an llguidance Lark grammar with each call's schema inlined by `%json`.

For hermes, with two functions and parallel calls:

    start: call ("\\n" call)*
    call: "<tool_call>\\n" (f0 | f1) "\\n</tool_call>"
    f0: %json {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {...}}, ...}

An `answer` (a response_format's grammar) adds the other way to reply, for `tool_choice: auto` with a response
format: `start: calls | answer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from unsloth_core.constrained import ANY_JSON_OBJECT, JSON_LAYOUT, Constraint
from unsloth_core.tool_calls.conventions import Convention, Tool

NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}  # OpenAI: parameters omitted


def call_schema(name: str, parameters: dict[str, Any] | None, arguments_key: str) -> dict[str, Any]:
    """The JSON schema of one call's object. The parameters' `$defs` move to the root, where their `#/$defs/...`
    references point (pydantic and zod write nested models that way)."""
    params = dict(parameters) if parameters is not None else dict(NO_PARAMETERS)
    definitions = {k: params.pop(k) for k in ("$defs", "definitions") if k in params}
    return {"type": "object", "properties": {"name": {"const": name}, arguments_key: params},
            "required": ["name", arguments_key], "additionalProperties": False, **definitions,
            "x-guidance": dict(JSON_LAYOUT)}


def tool_call_constraint(convention: Convention, tools: Sequence[Tool], parallel: bool = True,
                         answer: Constraint | None = None) -> Constraint:
    """A reply of one call (or, with `parallel`, one or more) of `tools` (OpenAI's function tools), or `answer`."""
    functions = [t["function"] for t in tools]
    rules = [f"f{i}: %json {json.dumps(call_schema(f['name'], f.get('parameters'), convention.arguments_key))}"
             for i, f in enumerate(functions)]
    call = " ".join(x for x in (_literal(convention.open), "(" + " | ".join(f"f{i}" for i in range(len(functions)))
                                + ")", _literal(convention.close)) if x)
    calls = f"call ({_literal(convention.separator)} call)*" if parallel else "call"
    lines = [f"start: {calls}" if answer is None else f"start: ({calls}) | answer", f"call: {call}", *rules]
    if answer is not None:
        lines.append(f"answer: %json {json.dumps(_answer_schema(answer))}")
    return Constraint("lark", "\n".join(lines) + "\n")


def _answer_schema(answer: Constraint) -> dict[str, Any] | bool:
    if answer.kind == "json_object":
        schema: Any = ANY_JSON_OBJECT
    elif answer.kind == "json_schema":
        schema = json.loads(answer.source)
    else:
        raise ValueError(f"a {answer.kind} answer cannot be combined with tool calls")
    if isinstance(schema, bool):
        return schema
    return {**schema, "x-guidance": {**JSON_LAYOUT, **schema.get("x-guidance", {})}}


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""
