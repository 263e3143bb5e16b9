"""`/v1/files` through the openai SDK: upload (streamed, capped, validated line by line), list with paging, retrieve,
content, delete, and ownership."""

from __future__ import annotations

import socket

import httpx
import openai
import pytest

from tests.app.conftest import Backend, chat_rows, jsonl, upload
from tests.helpers import wait_until
from tests.small_disk import fill, small_disk

BROKEN = (
    jsonl(chat_rows(2))
    + b'{"messages": [{"role": "user", "content": "hi"}\n'  # line 3: not JSON
    + b'{"messages": [{"role": "user", "content": "hi"}]}\n'  # line 4: nothing to learn
    + jsonl(chat_rows(1, seed=1))
    + b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'  # line 6
)


def test_upload_retrieve_content_delete(backend: Backend) -> None:
    client = backend.client()
    content = jsonl(chat_rows(12))
    f = upload(client, content, name="facts.jsonl")
    assert (f.object, f.purpose, f.status, f.filename, f.bytes) == ("file", "fine-tune", "processed", "facts.jsonl",
                                                                    len(content))
    report = f.model_extra["validation"]
    assert report["ok"] and report["n_examples"] == 12 and report["format"] == "chat"
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).content == content
    assert f.id in [x.id for x in client.files.list(purpose="fine-tune")]
    deleted = client.files.delete(f.id)
    assert (deleted.id, deleted.deleted) == (f.id, True)
    with pytest.raises(openai.NotFoundError) as e:
        client.files.retrieve(f.id)
    assert e.value.code == "file_not_found"
    assert f.id not in [x.id for x in client.files.list()]


def test_list_pages_with_after(backend: Backend) -> None:
    client = backend.client(backend.new_key())
    made = [upload(client, jsonl(chat_rows(1, seed=i))).id for i in range(5)]
    first = client.files.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    assert [f.id for f in client.files.list(limit=2)] == made[::-1]  # the SDK follows `after` page by page
    assert [f.id for f in client.files.list(limit=2, order="asc")] == made
    rest = client.files.list(limit=10, after=made[3])
    assert [f.id for f in rest.data] == made[2::-1] and not rest.has_more


def test_broken_lines_are_each_reported_and_refused_for_training(backend: Backend) -> None:
    client = backend.client()
    f = upload(client, BROKEN)
    assert f.status == "error"
    report = f.model_extra["validation"]
    assert [(e["line"], e["code"]) for e in report["errors"]] == [(3, "invalid_json"), (4, "no_assistant_message"),
                                                                   (6, "unrecognized_role")]
    assert "line 3" in (f.status_details or "")
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="tiny-chat", training_file=f.id)
    assert (e.value.param, e.value.code) == ("training_file", "invalid_training_file")
    assert "line 3" in e.value.message


def test_a_list_returns_summaries_and_a_report_keeps_its_first_bad_lines(backend: Backend) -> None:
    """Issue 15: a 4,000-byte upload of bad lines stored and returned a 140 KB report, in every list too, so 10k
    cheap uploads and one list built ~1.4 GB. Now a stored report lists the first 100 bad lines (all are counted),
    and a list returns each file's report without its bad lines."""
    client = backend.client(backend.new_key())
    bad = b"".join(b'{"messages": [{"role": "nobody", "content": "%d"}]}\n' % i for i in range(300))
    f = upload(client, bad)
    report = f.model_extra["validation"]
    assert f.status == "error" and report["n_errors"] == 300 and report["errors_truncated"]
    assert len(report["errors"]) == 100 and report["errors"][0]["line"] == 1
    assert all(len(e["message"]) <= 300 for e in report["errors"])
    assert client.files.retrieve(f.id).model_extra["validation"] == report
    listed = client.files.list().data
    assert [x.id for x in listed] == [f.id]
    summary = listed[0].model_extra["validation"]
    assert "errors" not in summary and summary["n_errors"] == 300 and summary["error_counts"]
    raw = httpx.get(backend.base_url + "/v1/files", headers={"Authorization": f"Bearer {client.api_key}"})
    assert len(raw.content) < 2_000  # one file's entry, not its report


def test_upload_over_the_size_cap_is_413(backend: Backend) -> None:
    client = backend.client()
    line = jsonl(chat_rows(1))
    too_big = line * (backend.settings.max_upload_bytes // len(line) + 20)
    with pytest.raises(openai.APIStatusError) as e:
        upload(client, too_big)
    assert e.value.status_code == 413 and e.value.code == "file_too_large"


def test_upload_over_the_line_cap_is_refused(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend.settings, "max_file_lines", 3)
    with pytest.raises(openai.BadRequestError) as e:
        upload(backend.client(), jsonl(chat_rows(4)))
    assert (e.value.param, e.value.code) == ("file", "too_many_lines")


def test_upload_needs_a_purpose_and_multipart(backend: Backend) -> None:
    client = backend.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="nonsense")  # type: ignore[arg-type]
    assert e.value.param == "purpose"
    headers = {"Authorization": f"Bearer {backend.user_key}"}
    r = httpx.post(f"{backend.base_url}/v1/files", headers=headers, files={"file": ("a.jsonl", b"{}\n")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = httpx.post(f"{backend.base_url}/v1/files", headers=headers, json={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"


def test_other_keys_files_are_invisible(backend: Backend) -> None:
    mine = upload(backend.client(), jsonl(chat_rows(1)))
    other = backend.client(backend.other_key)
    for call in (other.files.retrieve, other.files.delete, other.files.content):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    assert mine.id not in [f.id for f in other.files.list()]
    admin = backend.client(backend.admin_key)
    assert admin.files.retrieve(mine.id).id == mine.id  # UNSLOTH_API_KEY sees everything


def _partial_upload(backend: Backend, key: str) -> tuple[socket.socket, bytes]:
    """A multipart upload over a raw socket, its body sent only in part: (the socket, the rest of the body)."""
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + jsonl(chat_rows(2))
    tail = f"\r\n--{boundary}--\r\n".encode()
    host, port = backend.base_url.removeprefix("http://").split(":")
    head = (f"POST /v1/files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body) + len(tail)}\r\n"
            "\r\n").encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head + body)
    return sock, tail


def _answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split()[1]), data


def test_an_upload_holds_no_database_connection_while_its_body_arrives(backend: Backend) -> None:
    """Issue 15: the route's session stayed open (idle in transaction) for the whole body, so 30 slow uploads took
    the PostgreSQL pool. Once the server writes the upload's staging file it is reading the body; no pooled
    connection is checked out then."""
    files_dir = backend.settings.files_dir
    before = set(files_dir.glob(".upload-*.part"))
    key = backend.new_key()
    backend.client(key).files.list()  # used just now: authenticating it again writes nothing (and commits nothing)
    sock, tail = _partial_upload(backend, key)
    with sock:
        wait_until(lambda: set(files_dir.glob(".upload-*.part")) - before)
        assert backend.ctx.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        sock.sendall(tail)
        status, data = _answer(sock)
    assert status == 200 and b'"status":"processed"' in data.replace(b" ", b"")


def test_a_stalled_upload_is_cut_off(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend.ctx, "settings", backend.settings.model_copy(update={"upload_idle_timeout_s": 0.5}))
    sock, _ = _partial_upload(backend, backend.user_key)
    with sock:
        status, data = _answer(sock)  # the rest of the body never comes
    assert status == 408 and b"upload_timeout" in data and b"connection: close" in data.lower()


def test_an_exhausted_connection_pool_is_503_with_retry_after(backend: Backend,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    from app.services import files

    def busy(**_: object) -> None:
        raise PoolTimeoutError("QueuePool limit of size 10 overflow 20 reached, connection timed out, timeout 30")

    monkeypatch.setattr(files, "list_files", busy)
    r = httpx.get(backend.base_url + "/v1/files", headers={"Authorization": f"Bearer {backend.user_key}"})
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "database_busy"


def test_a_key_cannot_fill_the_disk(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: per key, stored files are capped in number and in bytes (429 insufficient_quota), the bytes checked
    once the upload has arrived (its staged copy removed); deleting makes room again. Other keys are not counted."""
    content = jsonl(chat_rows(2))
    monkeypatch.setattr(backend.ctx, "settings", backend.settings.model_copy(
        update={"max_files_per_key": 2, "max_file_bytes_per_key": 2 * len(content) + 10}))
    client = backend.client(backend.new_key())
    first, _ = upload(client, content), upload(client, content)
    with pytest.raises(openai.RateLimitError) as e:
        upload(client, content)
    assert e.value.code == "insufficient_quota" and "2 files" in e.value.message
    assert e.value.response.headers["x-should-retry"] == "false"  # the SDK does not retry what waiting cannot cure
    client.files.delete(first.id)
    with pytest.raises(openai.RateLimitError) as e:
        upload(client, content + content)  # the count has room, the bytes have not
    assert e.value.code == "insufficient_quota" and "bytes" in e.value.message
    assert not list(backend.settings.files_dir.glob(".upload-*.part"))
    assert upload(client, content).status == "processed"
    assert upload(backend.client(backend.new_key()), content).status == "processed"  # another key: its own quota


def test_an_upload_that_fills_the_disk_is_507_storage_full_and_leaves_nothing(backend: Backend) -> None:
    """Issue 15: the files dir on a small filesystem of its own: an upload that cannot be written whole answers
    507 with code storage_full (not a 500), its partial file removed; once there is room, uploads work again."""
    client = backend.client(backend.new_key())
    content = jsonl(chat_rows(400))  # about 60 KB
    with small_disk(backend.settings.files_dir, "256k") as files_dir:
        filler = fill(files_dir, leave=len(content) // 2)
        with pytest.raises(openai.APIStatusError) as e:
            upload(client, content)
        assert e.value.status_code == 507
        assert (e.value.code, e.value.param, e.value.type) == ("storage_full", "file", "server_error")
        assert "storage is full" in e.value.message
        assert sorted(p.name for p in files_dir.iterdir()) == [filler.name]  # no partial upload left
        filler.unlink()
        assert upload(client, content).status == "processed"
