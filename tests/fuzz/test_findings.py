"""Each failure the fuzzers found, pinned as a plain regression test (on SQLite and PostgreSQL): the fuzzers explore,
these keep the fixes."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import httpx

from tests.app.conftest import TINY, chat_rows, jsonl
from tests.fuzz.conftest import Live, upload_training_file


def error(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return dict(body["error"])


def raw(live: Live, method: str, path: str, body: bytes | None = None) -> http.client.HTTPResponse:
    url = urlsplit(live.base_url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {live.key}",
                                                   "Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_nul_in_identifiers_is_400_not_500(live: Live) -> None:
    """PostgreSQL cannot compare or store a string with a NUL: every id, cursor and stored text refuses it."""
    file_id = live.objects["file"][0]
    with live.http() as http:
        for path in ("/v1/files/file-%00", "/v1/fine_tuning/jobs/%00/events", "/v1/models/a%00b",
                     "/v1/fine_tuning/jobs?after=%00", "/v1/files?after=x%00", "/v1/files?purpose=%00"):
            response = http.get(path)
            assert response.status_code == 400, (path, response.text)
            error(response)
        for body in ({"model": f"{TINY}\x00", "training_file": file_id},
                     {"model": TINY, "training_file": f"{file_id}\x00"},
                     {"model": TINY, "training_file": file_id, "metadata": {"k": "v\x00"}},
                     {"model": TINY, "training_file": file_id, "metadata": {"k\x00": "v"}},
                     {"model": TINY, "training_file": file_id,
                      "integrations": [{"type": "wandb", "wandb": {"project": "p\x00"}}]}):
            response = http.post("/v1/fine_tuning/jobs", json=body)
            assert response.status_code == 400, (body, response.text)
            assert error(response)["param"] is not None
        response = http.post("/v1/completions", json={"model": f"{TINY}\x00", "prompt": "hi"})
        assert response.status_code == 400 and error(response)["param"] == "model"


def test_control_characters_in_url_paths(live: Live) -> None:
    """`$` in route patterns also matches before a final newline: `/v1/models/tiny-chat%0a` was tiny-chat."""
    for path in (f"/v1/models/{TINY}%0a", f"/v1/models/{TINY}%0d", "/v1/files/x%0a/content", "/v1/models%00"):
        assert raw(live, "GET", path).status == 400, path
    assert raw(live, "DELETE", f"/v1/models/{TINY}%0a").status == 400


def test_no_redirects_for_trailing_slashes(live: Live) -> None:
    with live.http() as http:
        for path in ("/v1/files/", "/v1/fine_tuning/jobs/", f"/v1/files/{live.objects['file'][0]}/"):
            response = http.get(path)
            assert response.status_code == 404, (path, response.status_code)
            error(response)


def test_allow_header_names_the_methods_of_the_path(live: Live) -> None:
    """`/v1/fine_tuning/jobs/validate` is the dry run only: the `/{job_id}` route no longer takes "validate"."""
    with live.http() as http:
        for method in ("GET", "OPTIONS", "DELETE", "PUT"):
            response = http.request(method, "/v1/fine_tuning/jobs/validate")
            assert response.status_code == 405, (method, response.text)
            assert response.headers["allow"] == "POST"
        assert http.options("/v1/fine_tuning/jobs").headers["allow"] == "GET, POST"
        job = live.objects["job"][0]
        assert http.get(f"/v1/fine_tuning/jobs/{job}").status_code == 200
        assert http.get("/v1/fine_tuning/jobs/validate/events").status_code == 404  # a job named so: none


def test_unpaired_surrogates_are_refused_at_the_door(live: Live) -> None:
    """Such a string is not Unicode text: it used to reach the tokenizer (500) or the answer's UTF-8 encoder."""
    bodies = [("/v1/completions", b'{"model": "tiny-chat", "prompt": "hi \\ud800", "max_tokens": 1}'),
              ("/v1/chat/completions", b'{"model": "tiny-chat", "max_tokens": 1, '
                                       b'"messages": [{"role": "user", "content": "\\udfff"}]}'),
              ("/v1/fine_tuning/jobs", b'{"model": "tiny-chat", "training_file": "x", "metadata": {"a": "\\ud83d"}}')]
    for path, body in bodies:
        response = raw(live, "POST", path, body)
        assert response.status == 400, (path, response.status)
    with live.http() as http:  # a paired surrogate escape is an ordinary character
        ok = http.post("/v1/completions", content=b'{"model": "tiny-chat", "prompt": "\\ud83d\\ude00", '
                                                  b'"max_tokens": 1}', headers={"Content-Type": "application/json"})
        assert ok.status_code == 200, ok.text


def test_request_fields_are_not_coerced(live: Live) -> None:
    file_id = live.objects["file"][0]
    with live.http() as http:
        for hp in ({"n_epochs": "3"}, {"warmup_ratio": False}, {"batch_size": True}, {"lora_r": 8.0}):
            body = {"model": TINY, "training_file": file_id,
                    "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}
            for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/validate"):
                response = http.post(path, json=body)
                assert response.status_code == 400, (hp, path, response.text)
        for extra in ({"max_tokens": "2"}, {"stream": "true"}, {"n": 1.5}, {"n": True}, {"temperature": "1"}):
            response = http.post("/v1/completions", json={"model": TINY, "prompt": "hi", **extra})
            assert response.status_code == 400, (extra, response.text)
        assert http.post("/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 1,
                                                  "temperature": 1}).status_code == 200  # an int is a number
        # and an integral number is an integer, as JSON Schema counts it (a sampling field's "n": 1.0)
        assert http.post("/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 1.0,
                                                  "n": 1.0}).status_code == 200


def test_openapi_documents_streams_files_and_headers(live: Live) -> None:
    with live.http() as http:
        paths = http.get("/openapi.json").json()["paths"]
    for path, method in (("/v1/completions", "post"), ("/v1/chat/completions", "post"),
                         ("/v1/fine_tuning/jobs/{job_id}/events", "get")):
        assert set(paths[path][method]["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert "application/octet-stream" in paths["/v1/files/{file_id}/content"]["get"]["responses"]["200"]["content"]
    assert "Retry-After" in paths["/v1/completions"]["post"]["responses"]["429"]["headers"]
    assert "WWW-Authenticate" in paths["/v1/files"]["get"]["responses"]["401"]["headers"]
    assert paths["/v1/fine_tuning/jobs/{job_id}"]["get"]["parameters"][0]["schema"]["pattern"]


def test_event_stream_with_any_cursor(live: Live) -> None:
    """`after` is compared, not parsed: a cursor that is not one of our ids used to break the stream."""
    job = live.objects["job"][1]  # finished: the stream ends with [DONE]
    with live.http() as http:
        for after in ("ft-event-zzzz", "ft-event-", "x", "ft-event-0000000000000000"):
            response = http.get(f"/v1/fine_tuning/jobs/{job}/events", params={"stream": "true", "after": after})
            assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]"), response.text


def test_missing_file_content_is_404(live: Live) -> None:
    file_id = upload_training_file(live)
    (live.settings.files_dir / f"{file_id}.jsonl").unlink()
    with live.http() as http:
        response = http.get(f"/v1/files/{file_id}/content")
        assert response.status_code == 404 and error(response)["code"] == "file_content_missing"
        response = http.post("/v1/fine_tuning/jobs/validate", json={"model": TINY, "training_file": file_id})
        assert response.status_code == 404 and error(response)["param"] == "training_file"


def test_client_file_names_are_labels(live: Live) -> None:
    """Raw control bytes in the multipart file name (httpx would percent-encode them; curl and others do not): a NUL
    once made PostgreSQL refuse the row."""
    body = (b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a\x00b\x1f\x7f\xff.jsonl"\r\n\r\n'
            + jsonl(chat_rows(2)) + b"\r\n--B--\r\n")
    with live.http() as http:
        response = http.post("/v1/files", content=body, headers={"Content-Type": "multipart/form-data; boundary=B"})
    assert response.status_code == 200, response.text
    assert response.json()["filename"] == "ab\ufffd.jsonl"


def test_report_messages_are_storable(live: Live) -> None:
    """A line's error message quotes what the line holds: a key with a NUL once made PostgreSQL refuse the report."""
    content = b'{"\\u0000key": 1}\n{"messages": [{"role": "\\u0000", "content": "x"}]}\n'
    with live.http() as http:
        response = http.post("/v1/files", files={"file": ("t.jsonl", content)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    errors = response.json()["validation"]["errors"]
    assert [(e["line"], e["code"]) for e in errors] == [(1, "unknown_format"), (2, "unrecognized_role")]
    assert "\\x00" in errors[0]["message"] and "\x00" not in json.dumps(errors, ensure_ascii=False)
