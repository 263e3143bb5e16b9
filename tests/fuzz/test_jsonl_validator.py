"""Hypothesis on the JSONL validator (`unsloth_core.data.validate_file`), reliability.md A2: whatever the bytes
(random, invalid UTF-8, BOMs, CRLF, huge lines, JSON nested thousands deep, empty), it returns a report and never
raises; every line number it reports is a line of the file; every message is text a database and a JSON answer can
hold (no NUL, no unpaired surrogate); valid files are accepted with the right count; a bad line is reported at its
own number."""

from __future__ import annotations

import codecs
import io
import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import make_tiny_tokenizer
from unsloth_core.data import ValidationReport, validate_file
from unsloth_core.data.validation import MAX_DEPTH

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOKENIZER = make_tiny_tokenizer()


def physical_lines(data: bytes) -> int:
    """Lines as the validator numbers them: split on \\n, a last line without its newline counts."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def check_report(data: bytes, report: ValidationReport) -> None:
    n = physical_lines(data)
    assert report.n_errors >= len(report.errors)
    assert report.ok == (report.n_errors == 0)
    for error in report.errors:
        assert error.line is None or 1 <= error.line <= n, (error, n)
        assert error.code and error.message
    encoded = json.dumps(report.to_dict(), ensure_ascii=False)
    encoded.encode("utf-8")  # no unpaired surrogate anywhere
    assert "\x00" not in encoded and "\\u0000" not in encoded  # PostgreSQL's jsonb refuses both
    lines = [e.line for e in report.errors if e.line is not None]
    assert lines == sorted(lines)  # one pass, in order


def run(data: bytes, **kwargs: Any) -> ValidationReport:
    report = validate_file(io.BytesIO(data), **kwargs)
    check_report(data, report)
    return report


# ---- strategies ----

text = st.text(st.characters(codec="utf-8"), max_size=40)  # any Unicode scalar: NUL, RTL marks, emoji, ...
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(text, inner, max_size=4), max_leaves=12)


@st.composite
def chat_example(draw: st.DrawFn) -> dict[str, Any]:
    turns = draw(st.integers(1, 3))
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text)})
    for _ in range(turns):
        messages.append({"role": "user", "content": draw(text)})
        messages.append({"role": "assistant", "content": draw(text.filter(lambda t: t.strip() != ""))})
    return {"messages": messages}


@st.composite
def jsonl_file(draw: st.DrawFn, rows: st.SearchStrategy[Any]) -> tuple[bytes, int]:
    """(bytes, number of examples): the rows as JSON Lines, with optional BOM, CRLF endings, blank lines and a
    missing final newline."""
    items = draw(st.lists(rows, min_size=1, max_size=6))
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    lines = []
    for item in items:
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from([b"", b"  ", b"\t", b"\r"])))  # blank lines are skipped
        lines.append(json.dumps(item, ensure_ascii=draw(st.booleans())).encode())
    data = newline.join(lines) + (newline if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        data = codecs.BOM_UTF8 + data
    return data, len(items)


# ---- properties ----


@FAST
@given(st.binary(max_size=2048))
@example(b"")
@example(b"\n\n \r\n")
@example(codecs.BOM_UTF8)
@example(codecs.BOM_UTF16_LE + '{"text": "x"}\n'.encode("utf-16-le"))
@example(b'{"text": "\xff\xfe"}\n')
@example(b'{"\\u0000": 1}\n{"role": "\\ud800"}\n')
@example(b'{"messages": [{"role": "\\u0000\\ud800", "content": "x"}]}\n')
def test_random_bytes_never_raise(data: bytes) -> None:
    report = run(data)
    if not data.strip(b" \t\r\n" + codecs.BOM_UTF8):
        assert [(e.line, e.code) for e in report.errors] == [(None, "empty_file")]


@FAST
@given(st.lists(json_value, max_size=6), st.sampled_from([None, "sft", "dpo"]))
def test_random_json_lines_never_raise(rows: list[Any], purpose: str | None) -> None:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    run(data, purpose=purpose)


@FAST
@given(st.lists(st.dictionaries(st.sampled_from(["messages", "role", "content", "weight", "prompt", "completion",
                                                 "chosen", "rejected", "input", "preferred_output",
                                                 "non_preferred_output", "text", "tools", "conversations"]),
                                json_value, max_size=4), max_size=5))
def test_format_shaped_rows_never_raise(rows: list[dict[str, Any]]) -> None:
    """Objects with the keys the formats look for, holding anything: every parser branch, never an exception."""
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    run(data)
    run(data, tokenizer=TOKENIZER, max_seq_length=64)


@FAST
@given(jsonl_file(chat_example()))
def test_valid_files_are_accepted(file: tuple[bytes, int]) -> None:
    data, n = file
    report = run(data, purpose="sft")
    assert report.ok, report.errors
    assert (report.format, report.n_examples) == ("chat", n)
    assert run(data, tokenizer=TOKENIZER, max_seq_length=512).ok


@FAST
@given(jsonl_file(chat_example()), st.data())
def test_a_bad_line_is_reported_at_its_number(file: tuple[bytes, int], data: st.DataObject) -> None:
    content, _ = file
    lines = content.split(b"\n")
    candidates = [i for i, line in enumerate(lines) if line.strip(b" \t\r" + codecs.BOM_UTF8)]
    index = data.draw(st.sampled_from(candidates))
    bad = data.draw(st.sampled_from([b"{not json", b"[1, 2]", b'{"messages": []}', b"\xc3\x28 not utf-8",
                                     b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
                                     b"[" * 5000, b'{"x": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}"]))
    lines[index] = bad
    report = run(b"\n".join(lines))
    assert [e.line for e in report.errors] == [index + 1]


def test_depth_bombs() -> None:
    for depth in (MAX_DEPTH - 2, MAX_DEPTH, MAX_DEPTH + 1, 990, 5000, 200_000):
        for opening, closing in ((b"[", b"]"), (b'{"a":', b"}")):
            bomb = opening * depth + b"1" + closing * depth
            line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "t": ' \
                   + bomb + b"}]}"
            for data in (bomb + b"\n", line + b"\n"):
                report = run(data)
                if depth > MAX_DEPTH:
                    assert report.errors[0].code == "invalid_json", report.errors[0]


def test_huge_lines() -> None:
    small = run(b'{"text": "a"}\n' + b'{"text": "' + b"x" * 5000 + b'"}\n{"text": "b"}', max_line_bytes=1024)
    assert [(e.line, e.code) for e in small.errors] == [(2, "line_too_large")]
    assert small.n_examples == 2
    big = b'{"text": "' + b"y" * (5 * 2**20) + b'"}\n'  # 5 MB: under the default cap, one example
    assert run(big + b'{"text": "z"}\n').n_examples == 2
    unterminated = b'{"text": "' + b"z" * 3000  # no closing quote, no newline, over the cap
    assert [(e.line, e.code) for e in run(unterminated, max_line_bytes=1024).errors] == [(1, "line_too_large")]


def test_messages_name_bad_values_safely() -> None:
    report = run(b'{"messages": [{"role": "' + b"\\u0000" * 3 + b"r" * 500 + b'", "content": "x"}]}\n'
                 b'{"\\ud800key": 1}\n{"messages": [{"role": "assistant", "content": "x", "weight": '
                 + b"9" * 4000 + b"}]}\n")
    assert [e.code for e in report.errors] == ["unrecognized_role", "invalid_utf8", "invalid_weight"]
    assert all(len(e.message) < 300 for e in report.errors), report.errors
