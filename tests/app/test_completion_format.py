"""How streamed chunks are written: each SSE event is one line whatever the model emits."""

from __future__ import annotations

import json

import httpx
import pytest

from app.services.completion_format import ChatFormatter, CompletionFormatter, Formatter, Header
from unsloth_core.request_state import Delta

LINE_BREAKERS = "\x85\u2028\u2029"  # str.splitlines ends a line at each; JSON allows them raw inside strings


@pytest.mark.parametrize("formatter", [ChatFormatter(Header("chatcmpl-1", 0, "m", False, None)),
                                       CompletionFormatter(Header("cmpl-1", 0, "m", False, None), n_choices=1)],
                         ids=["chat", "completion"])
def test_a_token_holding_a_unicode_line_separator_stays_one_sse_line(formatter: Formatter) -> None:
    text = f"a{LINE_BREAKERS}b"
    event = formatter.sse(formatter.delta(Delta(index=0, text=text, token_ids=[1])))
    lines = [line for line in httpx.Response(200, content=event.encode()).iter_lines() if line]  # as httpx reads SSE
    assert len(lines) == 1 and lines[0].startswith("data: ")
    choice = json.loads(lines[0][6:])["choices"][0]
    assert (choice["delta"]["content"] if "delta" in choice else choice["text"]) == text
