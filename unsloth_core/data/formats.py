"""Training-file formats: detected by the keys of each JSON line, parsed into the dataclasses of `examples.py`.

| format              | keys (one JSON object per line)                                   | purpose |
|---------------------|-------------------------------------------------------------------|---------|
| `chat`              | `messages` (OpenAI chat; assistant `weight` 0/1; `tools`)         | sft     |
| `sharegpt`          | `conversations` of `{from, value}` (human/gpt/system, user/assistant) | sft |
| `alpaca`            | `instruction`, `output` (+ `input`, `system` optional)            | sft     |
| `prompt_completion` | `prompt`, `completion`                                            | sft     |
| `text`              | `text`                                                            | sft     |
| `preference`        | `input` {messages}, `preferred_output`, `non_preferred_output` (OpenAI DPO) | dpo |
| `chosen_rejected`   | `prompt`, `chosen`, `rejected` (strings or message lists)         | dpo     |
| `rl_messages`       | `messages` ending before the reply (OpenAI RFT) + grader fields   | rl      |
| `rl_prompt`         | `prompt` alone (TRL's prompt-only rows) + reward fields           | rl      |

Structured shapes are tried before `text`, so an alpaca row that also carries a pre-rendered `text` (as tatsu-lab's
alpaca does) is still alpaca. A `messages` row that ends before the reply is a prompt for reinforcement learning, not a
conversation to learn from; read for an RL job (`purpose="rl"`), any `messages` or `prompt` row is one. Parsing
stops at a line's first problem and raises `RowError(code, message)`; the message names the field
(`messages[2].content`) so a person can find and fix it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from unsloth_core.data.examples import (
    ROLES,
    ChatExample,
    CompletionExample,
    Example,
    Message,
    PreferenceExample,
    RLExample,
    Role,
    TextExample,
)

Purpose = Literal["sft", "dpo", "rl"]
Row = Mapping[str, Any]

# sharegpt speakers; OpenAI role names are accepted too, since many sharegpt-style files mix them.
SHAREGPT_ROLES: dict[str, Role] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                                   "system": "system", "tool": "tool"}
OPENAI_ROLES: dict[str, Role] = {r: r for r in ROLES}
# RFT rows use OpenAI's `developer` role, which open models' chat templates know as `system`.
RL_ROLES: dict[str, Role] = {**OPENAI_ROLES, "developer": "system"}


class RowError(Exception):
    """One line's first problem: a stable `code` for programs and a `message` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class Format:
    """A file format: the keys that must all be present, the keys that identify it even when some required key is
    missing (so the error says which one), and the parser."""

    name: str
    purpose: Purpose
    required: tuple[str, ...]
    markers: tuple[str, ...]
    parse: Callable[[Row], Example]


# ---- field helpers ----

def json_type(value: Any) -> str:
    """JSON's name for a value's type, for messages like 'must be a string, got a list'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object" if isinstance(value, dict) else type(value).__name__


def shown(value: Any, limit: int = 40) -> str:
    """A value from the file, for an error message: a string in single quotes, with control characters and unpaired
    surrogates escaped (the message is always printable, storable text) and cut at `limit` characters; a number as
    written (cut too); a list or object by its type only."""
    if isinstance(value, str):
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in value[:limit])
        return f"'{text}'" + ("..." if len(value) > limit else "")
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        if isinstance(value, int) and value.bit_length() > 128:  # str() of a 4000-digit integer is slow
            return f"an integer of {value.bit_length()} bits"
        return str(value)[:limit]
    return json_type(value)


def _string(row: Row, key: str, *, allow_empty: bool = False, where: str = "") -> str:
    name = where + key
    if row.get(key) is None:
        raise RowError("missing_field", f"`{name}` is missing; it must be a string")
    value = row[key]
    if not isinstance(value, str):
        raise RowError("invalid_content_type", f"`{name}` must be a string, got {json_type(value)}")
    if not allow_empty and not value.strip():
        raise RowError("empty_field", f"`{name}` is empty")
    return value


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or OpenAI content parts of type text (joined)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = f"a {shown(part.get('type', 'untyped'))} part" if isinstance(part, dict) else json_type(part)
                raise RowError("invalid_content_type", f"`{where}[{j}]` is {kind}; only text parts can be trained on")
            texts.append(part["text"])
        return "".join(texts)
    raise RowError("invalid_content_type",
                   f"`{where}` must be a string or a list of text parts, got {json_type(value)}")


def _message(item: Any, where: str, roles: Mapping[str, Role], role_key: str = "role",
             content_key: str = "content") -> Message:
    if not isinstance(item, dict):
        raise RowError("invalid_message", f"`{where}` must be an object with `{role_key}` and `{content_key}`, "
                                          f"got {json_type(item)}")
    if role_key not in item:
        raise RowError("invalid_message", f"`{where}` has no `{role_key}`")
    raw_role = item[role_key]
    if not isinstance(raw_role, str) or raw_role not in roles:
        raise RowError("unrecognized_role", f"`{where}.{role_key}` is {shown(raw_role)}; use one of {', '.join(roles)}")
    role = roles[raw_role]
    if item.get(content_key) is None:
        # OpenAI allows an assistant turn that only calls tools; its text is empty.
        if role != "assistant" or not (item.get("tool_calls") or item.get("function_call")):
            raise RowError("missing_content", f"`{where}` ({raw_role}) has no `{content_key}`")
        content = ""
    else:
        content = _content(item[content_key], f"{where}.{content_key}")
    trainable = role == "assistant"
    if "weight" in item:
        weight = item["weight"]
        if role != "assistant":
            raise RowError("invalid_weight", f"`{where}.weight`: only assistant messages take a weight")
        # bool is an int in Python, but `true` is not one of OpenAI's allowed values 0 and 1.
        if isinstance(weight, bool) or weight not in (0, 1):
            raise RowError("invalid_weight", f"`{where}.weight` is {shown(weight)}; it must be 0 (no loss) or 1")
        trainable = weight == 1
    extra = {k: v for k, v in item.items() if k not in (role_key, content_key, "role", "content", "weight")}
    return Message(role, content, trainable, extra)


def _messages(value: Any, where: str, roles: Mapping[str, Role] = OPENAI_ROLES, role_key: str = "role",
              content_key: str = "content") -> tuple[Message, ...]:
    if value is None:
        raise RowError("missing_messages", f"`{where}` is missing; it must be a list of messages")
    if not isinstance(value, list):
        raise RowError("missing_messages", f"`{where}` must be a list of messages, got {json_type(value)}")
    if not value:
        raise RowError("empty_messages", f"`{where}` is an empty list")
    return tuple(_message(m, f"{where}[{i}]", roles, role_key, content_key) for i, m in enumerate(value))


def _tools(row: Row, where: str = "") -> list[dict[str, Any]] | None:
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise RowError("invalid_field_type", f"`{where}tools` must be a list of tool objects")
    return tools


def _require_trainable(messages: tuple[Message, ...], where: str) -> None:
    if not any(m.role == "assistant" for m in messages):
        raise RowError("no_assistant_message", f"`{where}` has no assistant message to learn from")
    if not any(m.trainable for m in messages):
        raise RowError("no_assistant_message",
                       f"every assistant message in `{where}` has weight 0; nothing to train on")


def _prompt_end(prompt: tuple[Message, ...], where: str) -> None:
    if prompt[-1].role == "assistant":
        raise RowError("invalid_preference", f"`{where}` ends with an assistant message; the prompt must end with the "
                                             "turn the preferred and non-preferred replies answer")


def _distinct(chosen: Message, rejected: Message, names: str) -> None:
    # An identical pair has zero DPO gradient: it is almost always a data-preparation mistake.
    if (chosen.content, chosen.extra) == (rejected.content, rejected.extra):
        raise RowError("invalid_preference", f"{names} are identical; a preference pair needs two different replies")


# ---- parsers, one per format ----

def parse_chat(row: Row) -> ChatExample:
    messages = _messages(row["messages"], "messages")
    _require_trainable(messages, "messages")
    return ChatExample(messages, _tools(row))


def parse_sharegpt(row: Row) -> ChatExample:
    turns = row["conversations"]
    first = turns[0] if isinstance(turns, list) and turns else {}
    # Some exports label turns with role/content under `conversations`; take whichever pair the file uses.
    uses_roles = isinstance(first, dict) and "role" in first and "from" not in first
    keys = ("role", "content") if uses_roles else ("from", "value")
    messages = _messages(turns, "conversations", SHAREGPT_ROLES, *keys)
    _require_trainable(messages, "conversations")
    return ChatExample(messages, _tools(row))


def parse_alpaca(row: Row) -> ChatExample:
    instruction = _string(row, "instruction")
    output = _string(row, "output")
    extra_input = row.get("input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise RowError("invalid_content_type", f"`input` must be a string, got {json_type(extra_input)}")
    # The usual alpaca rendering: the input, when there is one, follows the instruction after a blank line.
    user = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages = [Message("user", user), Message("assistant", output, trainable=True)]
    if row.get("system") is not None:
        messages.insert(0, Message("system", _string(row, "system", allow_empty=True)))
    return ChatExample(tuple(messages))


def parse_prompt_completion(row: Row) -> CompletionExample:
    # An empty prompt is allowed (OpenAI's legacy format allowed it); an empty completion teaches nothing.
    return CompletionExample(_string(row, "prompt", allow_empty=True), _string(row, "completion"))


def parse_text(row: Row) -> TextExample:
    return TextExample(_string(row, "text"))


def _openai_reply(row: Row, key: str) -> Message:
    value = row[key]
    if not isinstance(value, list):
        raise RowError("invalid_preference", f"`{key}` must be a list holding one assistant message, got "
                                             f"{json_type(value)}")
    if len(value) != 1:
        raise RowError("invalid_preference", f"`{key}` must hold exactly one assistant message, got {len(value)}")
    reply = _message(value[0], f"{key}[0]", OPENAI_ROLES)
    if reply.role != "assistant":
        raise RowError("invalid_preference", f"`{key}[0]` is a {reply.role} message; it must be an assistant one")
    return Message("assistant", reply.content, True, reply.extra)


def parse_preference(row: Row) -> PreferenceExample:
    source = row["input"]
    if not isinstance(source, dict):
        raise RowError("invalid_preference", f"`input` must be an object with `messages`, got {json_type(source)}")
    prompt = _messages(source.get("messages"), "input.messages")
    _prompt_end(prompt, "input.messages")
    chosen, rejected = _openai_reply(row, "preferred_output"), _openai_reply(row, "non_preferred_output")
    _distinct(chosen, rejected, "`preferred_output` and `non_preferred_output`")
    return PreferenceExample(prompt, chosen, rejected, _tools(source, "input."))


def _reply(value: Any, key: str, prompt: tuple[Message, ...]) -> Message:
    """`chosen`/`rejected`: a string, one message, or a message list (which may repeat the prompt first)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_field", f"`{key}` is empty")
        return Message("assistant", value, trainable=True)
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value, key)
    # Datasets in the "conversational" style store whole conversations; drop the part that repeats the prompt.
    head = [(m.role, m.content) for m in messages[:len(prompt)]]
    if len(messages) > len(prompt) and head == [(m.role, m.content) for m in prompt]:
        messages = messages[len(prompt):]
    if len(messages) != 1 or messages[0].role != "assistant":
        raise RowError("invalid_preference", f"`{key}` must be one assistant reply to the prompt, got "
                                             f"{len(messages)} message(s) starting with {messages[0].role}")
    return Message("assistant", messages[0].content, True, messages[0].extra)


def parse_chosen_rejected(row: Row) -> PreferenceExample:
    if row.get("prompt") is None:
        raise RowError("missing_field", "`prompt` is missing; a `chosen`/`rejected` pair needs the prompt it answers")
    if isinstance(row["prompt"], str):
        prompt: tuple[Message, ...] = (Message("user", _string(row, "prompt")),)
    else:
        prompt = _messages(row["prompt"], "prompt")
        _prompt_end(prompt, "prompt")
    chosen, rejected = _reply(row["chosen"], "chosen", prompt), _reply(row["rejected"], "rejected", prompt)
    _distinct(chosen, rejected, "`chosen` and `rejected`")
    return PreferenceExample(prompt, chosen, rejected, _tools(row))


def parse_rl_messages(row: Row) -> RLExample:
    prompt = _messages(row["messages"], "messages", RL_ROLES)
    if prompt[-1].role == "assistant":
        raise RowError("invalid_prompt", "`messages` ends with an assistant message; a reinforcement prompt ends with "
                                         "the turn the model answers (the grader scores its reply)")
    return RLExample(prompt, {k: v for k, v in row.items() if k != "messages"}, _tools(row))


def parse_rl_prompt(row: Row) -> RLExample:
    value = row["prompt"]
    prompt: str | tuple[Message, ...]
    if isinstance(value, str):
        prompt = _string(row, "prompt")
    else:
        prompt = _messages(value, "prompt", RL_ROLES)
        if prompt[-1].role == "assistant":
            raise RowError("invalid_prompt", "`prompt` ends with an assistant message; a reinforcement prompt ends "
                                             "with the turn the model answers")
    return RLExample(prompt, {k: v for k, v in row.items() if k != "prompt"}, _tools(row))


RL_MESSAGES = Format("rl_messages", "rl", ("messages",), ("messages",), parse_rl_messages)
RL_PROMPT = Format("rl_prompt", "rl", ("prompt",), ("prompt",), parse_rl_prompt)

# Tried in this order: the first whose required keys are all present wins.
FORMATS: tuple[Format, ...] = (
    Format("preference", "dpo", ("input", "preferred_output", "non_preferred_output"),
           ("preferred_output", "non_preferred_output"), parse_preference),
    Format("chosen_rejected", "dpo", ("chosen", "rejected"), ("chosen", "rejected"), parse_chosen_rejected),
    Format("chat", "sft", ("messages",), ("messages",), parse_chat),
    Format("sharegpt", "sft", ("conversations",), ("conversations",), parse_sharegpt),
    Format("alpaca", "sft", ("instruction", "output"), ("instruction",), parse_alpaca),
    Format("prompt_completion", "sft", ("prompt", "completion"), ("completion",), parse_prompt_completion),
    Format("text", "sft", ("text",), ("text",), parse_text),
)
FORMATS_BY_NAME = {f.name: f for f in (*FORMATS, RL_MESSAGES, RL_PROMPT)}
# Keys that make a `prompt` row something other than a bare prompt.
_PROMPT_PARTNERS = ("completion", "chosen", "rejected")


def detect_format(row: Row, purpose: Purpose | None = None) -> Format:
    """The row's format by its keys; a row that has some of a format's keys but not all is that format with a field
    missing. Raises RowError(`unknown_format`) when no format's keys are there. For `purpose="rl"`, a `messages` or
    `prompt` row is a prompt whatever else it holds (a reference answer may well be called `completion`)."""
    rl = _rl_format(row, strict=purpose == "rl")
    if rl is not None:
        return rl
    for fmt in FORMATS:
        if all(k in row for k in fmt.required):
            return fmt
    for fmt in FORMATS:
        present = [k for k in fmt.markers if k in row]
        if present:
            missing = ", ".join(f"`{k}`" for k in fmt.required if k not in row)
            raise RowError("missing_field", f"looks like {fmt.name} (has `{present[0]}`) but {missing} is missing")
    keys = ", ".join(shown(k) for k in list(row)[:8]) or "no keys"
    known = "; ".join(" + ".join(f.required) for f in FORMATS)
    raise RowError("unknown_format", f"the object has {keys}, which match no known format ({known})")


def _rl_format(row: Row, *, strict: bool) -> Format | None:
    if "messages" in row:
        messages = row["messages"]
        # A conversation that ends before its reply is a prompt (earlier assistant turns are its history).
        no_reply = isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) and \
            messages[-1].get("role") not in ("assistant", "gpt")
        return RL_MESSAGES if strict or no_reply else None
    if "prompt" in row and (strict or not any(k in row for k in _PROMPT_PARTNERS)):
        return RL_PROMPT
    return None


def parse_row(row: Any) -> tuple[Format, Example]:
    """One decoded JSON line -> (its format, the normalised example). Raises RowError."""
    if not isinstance(row, dict):
        raise RowError("not_an_object", f"each line must be a JSON object, got {json_type(row)}")
    fmt = detect_format(row)
    return fmt, fmt.parse(row)
