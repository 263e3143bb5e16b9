"""Hypothesis on `POST /v1/files` against the live server (reliability.md A2), on SQLite and PostgreSQL: any file
content and any client file name is a 200 (the file stored, `processed` or `error` with line-numbered errors) or a
4xx with the error envelope, never a 5xx; every reported line is a line of the file; a file over the cap is a 413,
whether its size was declared or not; malformed multipart bodies are 400s."""

from __future__ import annotations

import codecs
import json
import uuid
from collections.abc import Iterator

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.app.conftest import chat_rows, jsonl
from tests.fuzz.conftest import MAX_UPLOAD_BYTES, Live
from tests.fuzz.test_jsonl_validator import physical_lines

LIVE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


def assert_envelope(response: httpx.Response) -> None:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error


def check_upload(response: httpx.Response, content: bytes) -> None:
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert_envelope(response)
        return
    body = response.json()
    assert body["bytes"] == len(content)
    assert not any(ord(c) < 32 or ord(c) == 127 for c in body["filename"]), body["filename"]
    report = body["validation"]
    if report is None:  # only fine-tune files are validated
        assert body["purpose"] != "fine-tune" and body["status"] == "processed"
        return
    assert body["status"] == ("processed" if report["ok"] else "error")
    n = physical_lines(content)
    for error in report["errors"]:
        assert error["line"] is None or 1 <= error["line"] <= n, (error, n)


lines = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda rows: jsonl(rows).rstrip(b"\n"), st.integers(1, 3).map(chat_rows)),
    st.sampled_from([b"{not json", b"[" * 3000, b'{"text": "\\ud800"}', b'{"\\u0000": 1}', b"\xef\xbb\xbf",
                     b'{"messages": [{"role": "\\u0000", "content": "x"}]}', b"\xc3\x28", b"\r"]),
)
contents = st.lists(lines, max_size=8).flatmap(
    lambda parts: st.sampled_from([b"\n", b"\r\n"]).map(lambda nl: nl.join(parts)))
names = st.text(max_size=40) | st.sampled_from(["../../etc/passwd", "/etc/passwd", "a\x00b.jsonl", "..\\..\\x",
                                                "\u2025\u2215etc", "%2e%2e%2fx", "C:\\x.jsonl", ""])


@LIVE
@given(content=contents, filename=names, purpose=st.sampled_from(["fine-tune", "batch", "fine-tune\x00", "x"]))
@example(content=b"", filename="empty.jsonl", purpose="fine-tune")
@example(content=codecs.BOM_UTF8 + jsonl(chat_rows(2)).replace(b"\n", b"\r\n"), filename="crlf.jsonl",
         purpose="fine-tune")
def test_uploads_never_fail_the_server(live: Live, content: bytes, filename: str, purpose: str) -> None:
    with live.http() as http:
        response = http.post("/v1/files", files={"file": (filename, content)}, data={"purpose": purpose})
    check_upload(response, content)
    if purpose in ("fine-tune", "batch"):
        assert response.status_code == 200, response.text


def test_valid_upload_is_processed(live: Live) -> None:
    content = codecs.BOM_UTF8 + jsonl(chat_rows(5)).replace(b"\n", b"\r\n")
    with live.http() as http:
        response = http.post("/v1/files", files={"file": ("ok.jsonl", content)}, data={"purpose": "fine-tune"})
        check_upload(response, content)
        assert response.json()["status"] == "processed"
        assert http.get(f"/v1/files/{response.json()['id']}/content").content == content


@LIVE
@given(body=st.binary(max_size=400), boundary=st.sampled_from(["b0undary", "x" * 70, "-", "a b"]))
@example(body=b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nabc",
         boundary="b0undary")
def test_malformed_multipart_is_a_4xx(live: Live, body: bytes, boundary: str) -> None:
    with live.http() as http:
        response = http.post("/v1/files", content=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert 400 <= response.status_code < 500, response.text
    assert_envelope(response)


def _multipart(content_chunks: Iterator[bytes], boundary: str) -> Iterator[bytes]:
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    yield from content_chunks
    yield f"\r\n--{boundary}--\r\n".encode()


def test_over_cap_upload_is_413(live: Live) -> None:
    line = json.dumps(chat_rows(1)[0]).encode() + b"\n"
    too_big = line * (MAX_UPLOAD_BYTES // len(line) + 2)
    just_fits = line * (MAX_UPLOAD_BYTES // len(line))
    with live.http() as http:
        declared = http.post("/v1/files", files={"file": ("big.jsonl", too_big)}, data={"purpose": "fine-tune"})
        assert declared.status_code == 413, declared.text
        assert_envelope(declared)
        boundary = uuid.uuid4().hex
        # Chunked, no Content-Length: the cap is counted as the bytes arrive.
        chunks = (too_big[i:i + 8192] for i in range(0, len(too_big), 8192))
        streamed = http.post("/v1/files", content=_multipart(chunks, boundary),
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert streamed.status_code == 413, streamed.text
        assert_envelope(streamed)
        fits = http.post("/v1/files", files={"file": ("fits.jsonl", just_fits)}, data={"purpose": "fine-tune"})
        assert fits.status_code == 200, fits.text
        assert fits.json()["status"] == "processed"
    staged = list(live.settings.files_dir.glob(".upload-*"))
    assert staged == [], staged  # refused uploads leave nothing behind
