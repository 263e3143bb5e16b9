"""A reply's text back into its text and its tool calls, as it streams or whole.

One incremental parser serves both: the whole text is parsed by pushing it at once, so a streamed answer's content
and calls are exactly the non-streamed answer's, however the text was cut. A call is handed out once it is complete
and checked (its JSON parses, its name is an offered function, its arguments are an object), never in pieces: a
call that turns out malformed is then still plain content, in both modes, and nothing sent has to be taken back.
Whitespace between text and a call is dropped (the template writes its own back when the turn is rendered again).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from unsloth_core.tool_calls.conventions import PYTHON_TAG, Convention, ToolCall


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class Call:
    index: int  # the call's position in the reply's tool_calls
    call: ToolCall


Event = Content | Call


class ToolCallParser:
    """Push text as it is generated, then `finish()`; each returns the events the text so far settles."""

    def __init__(self, convention: Convention, names: Collection[str] | None = None, parallel: bool = True) -> None:
        self.convention, self.names, self.parallel = convention, names, parallel
        self.calls = 0  # calls handed out

    def push(self, text: str) -> list[Event]:
        raise NotImplementedError

    def finish(self) -> list[Event]:
        raise NotImplementedError

    def read_call(self, text: str) -> ToolCall | None:
        """The call one JSON object's text spells, or None when it is no call of an offered function."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return self._call_of(value)

    def _call_of(self, value: Any) -> ToolCall | None:
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        if self.names is not None and value["name"] not in self.names:
            return None
        key = self.convention.arguments_key
        arguments = value.get(key, value.get("arguments", value.get("parameters", {})))
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))

    def _called(self, call: ToolCall) -> Call:
        self.calls += 1
        return Call(self.calls - 1, call)


def tool_call_parser(convention: Convention, names: Collection[str] | None = None,
                     parallel: bool = True) -> ToolCallParser:
    """A parser for one reply. `names`: the offered functions (a call of any other is content); `parallel=False`:
    only the first call is a call, any later one stays content."""
    kind = TaggedParser if convention.tagged else WholeReplyParser
    return kind(convention, names, parallel)


def parse_tool_calls(text: str, convention: Convention, names: Collection[str] | None = None,
                     parallel: bool = True) -> tuple[str, list[ToolCall]]:
    """(the reply's content, its calls) for a whole reply."""
    parser = tool_call_parser(convention, names, parallel)
    events = parser.push(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    return content, [e.call for e in events if isinstance(e, Call)]


class _Text:
    """Content around calls. Whitespace is held until text follows it: whitespace just before a call, and a reply's
    whitespace after its last call, is dropped; whitespace between text and later text stays (a call between them
    or not), so no two sentences run together."""

    def __init__(self) -> None:
        self.held = ""
        self.sent = False  # any content handed out yet
        self.called = False  # a call handed out yet

    def add(self, text: str) -> list[Event]:
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body):]
        if self.called and not self.sent:  # the reply opened with calls: its text starts at its first character
            body = body.lstrip()
        if not body:
            return []
        self.sent = True
        return [Content(body)]

    def call(self, event: Call) -> list[Event]:
        self.held, self.called = "", True
        return [event]

    def flush(self) -> list[Event]:
        held, self.held = self.held, ""
        return [Content(held)] if held and not self.called else []


class TaggedParser(ToolCallParser):
    """Calls between tags inside free text (hermes)."""

    def __init__(self, convention: Convention, names: Collection[str] | None = None, parallel: bool = True) -> None:
        super().__init__(convention, names, parallel)
        self.open, self.close = convention.open.strip(), convention.close.strip()
        self.buffer, self.in_call, self.text = "", False, _Text()

    def push(self, text: str) -> list[Event]:
        self.buffer += text
        out: list[Event] = []
        while True:
            tag = self.close if self.in_call else self.open
            at = self.buffer.find(tag)
            if at < 0:
                break
            body, self.buffer = self.buffer[:at], self.buffer[at + len(tag):]
            out += self._end_call(body) if self.in_call else self.text.add(body)
            self.in_call = not self.in_call
        if not self.in_call:  # send all but a tail that may be the start of an opening tag
            keep = _overlap(self.buffer, self.open)
            out += self.text.add(self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
        return out

    def finish(self) -> list[Event]:
        """A call the reply left unclosed still counts when its JSON is complete (some models stop there)."""
        rest, self.buffer = self.buffer, ""
        out = self._end_call(rest, closed=False) if self.in_call else self.text.add(rest)
        self.in_call = False
        return out + self.text.flush()

    def _end_call(self, body: str, closed: bool = True) -> list[Event]:
        call = self.read_call(body) if self.parallel or self.calls == 0 else None
        if call is None:
            return self.text.add(self.open + body + (self.close if closed else ""))
        return self.text.call(self._called(call))


class WholeReplyParser(ToolCallParser):
    """Calls that are the whole reply (llama3): a reply opening with `{` (or `<|python_tag|>`) is read as calls
    once it ends; any other reply is content from its first character on."""

    def __init__(self, convention: Convention, names: Collection[str] | None = None, parallel: bool = True) -> None:
        super().__init__(convention, names, parallel)
        self.buffer = ""
        self.mode: str | None = None  # None until the first visible character; then "calls" or "text"

    def push(self, text: str) -> list[Event]:
        if self.mode == "text":
            return [Content(text)] if text else []
        self.buffer += text
        head = self.buffer.lstrip()
        if self.mode is None and head and not (PYTHON_TAG.startswith(head) and head != PYTHON_TAG):
            self.mode = "calls" if head.startswith(("{", PYTHON_TAG)) else "text"
            if self.mode == "text":
                out, self.buffer = self.buffer, ""
                return [Content(out)]
        return []

    def finish(self) -> list[Event]:
        text, self.buffer = self.buffer, ""
        if self.mode != "calls":
            return [Content(text)] if text else []
        calls, rest = self._read_calls(text.strip().removeprefix(PYTHON_TAG))
        if not calls:
            return [Content(text)]
        events: list[Event] = [self._called(c) for c in calls]
        return events + ([Content(rest)] if rest else [])

    def _read_calls(self, text: str) -> tuple[list[ToolCall], str]:
        """(calls, the text after the last one taken); no calls when any part is not a call."""
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(text):
            try:
                value, end = decoder.raw_decode(text, at)
            except ValueError:
                return [], text
            call = self._call_of(value)
            if call is None:
                return [], text
            calls.append(call)
            at = _skip_separators(text, end)
            if not self.parallel:
                return calls, text[at:]
        return calls, ""


def _skip_separators(text: str, at: int) -> int:
    while at < len(text) and (text[at].isspace() or text[at] == ";"):
        at += 1
    return at


def _overlap(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
