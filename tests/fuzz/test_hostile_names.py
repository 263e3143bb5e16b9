"""Hostile names (reliability.md A3): traversal (`../`, percent-encoded, double-encoded, overlong UTF-8, unicode dots,
backslashes), absolute paths, NUL and other control characters, in every identifier that reaches the database or
the filesystem: file ids, job ids, model ids (base, `ft:...`, `...:ckpt-step-N`), cursors, body fields, and
`unsloth models import --name`. Each is a 400 or a 404 with the error envelope (405 where the path lands on another
route), never a 5xx, never a byte of a file outside the data dir.

Symbolic links planted in the data dir that lead outside it (a file's stored content, a job's directory, a file in
an adapter directory, an `<org>` directory under models/) are refused the same way: the file or model is gone
(404), deleting it removes the link and never its target, a worker refuses to write through it, and the model
store refuses to install through it.

Base-model entries under models/ are the operator's: `models/<name>` may itself be a link to a model kept
elsewhere (the test suites install models that way), so those links are followed; ids can only ever name such an
entry, never a path beyond it."""

from __future__ import annotations

import http.client
import json
import secrets
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.app.conftest import TINY
from tests.fuzz.conftest import Live, create_job, finish_job, upload_training_file, write_tiny_model

SENTINEL = b"SENTINEL-" + secrets.token_hex(8).encode()

# Path segments exactly as they go on the wire (http.client sends them verbatim; httpx would normalise `..`).
RAW_SEGMENTS = [
    "..", "../..", "../../etc/passwd", ".", "%2e%2e", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2f..%2fetc%2fpasswd",
    "%252e%252e%252f%252e%252e%252fetc", "%2fetc%2fpasswd", "/etc/passwd", "%00", "x%00y", "file-%00.jsonl",
    "%c0%ae%c0%ae%2f", "%e2%80%a5%2fetc", "%ef%bc%8e%ef%bc%8e%2fetc", "..%5c..%5cetc", "~root", "%0a", "%0d%0a",
    f"{TINY}%0a", f"{TINY}%00", f"{TINY}%2f..%2f..%2f..%2fetc", f"{TINY}/../../../etc", "test-org/..",
    f"ft:{TINY}::ftjob-x/../../..", "%7e", "a" * 600, "%ff%fe", "%ed%a0%80",
]
ENDPOINTS = [
    ("GET", "/v1/files/{}"), ("GET", "/v1/files/{}/content"), ("DELETE", "/v1/files/{}"),
    ("GET", "/v1/fine_tuning/jobs/{}"), ("GET", "/v1/fine_tuning/jobs/{}/events"),
    ("GET", "/v1/fine_tuning/jobs/{}/checkpoints"), ("POST", "/v1/fine_tuning/jobs/{}/cancel"),
    ("GET", "/v1/models/{}"), ("DELETE", "/v1/models/{}"),
    ("GET", "/v1/files?after={}"), ("GET", "/v1/fine_tuning/jobs?after={}"), ("GET", "/v1/files?purpose={}"),
]


def raw_request(live: Live, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    url = urlsplit(live.base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {live.key}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def assert_refused(status: int, body: bytes, allowed: tuple[int, ...] = (400, 404, 405)) -> None:
    assert status in allowed, (status, body[:300])
    assert SENTINEL not in body
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory outside every data dir, holding a sentinel the server must never send."""
    root = tmp_path_factory.mktemp("outside")
    (root / "secret.jsonl").write_bytes(SENTINEL + b"\n")
    return root


@pytest.mark.parametrize(("method", "template"), ENDPOINTS, ids=[f"{m} {t}" for m, t in ENDPOINTS])
def test_hostile_path_and_query_identifiers(live: Live, method: str, template: str) -> None:
    for segment in RAW_SEGMENTS:
        if "?" in template:  # a cursor or a filter is compared, never used as a name: any page, or a 400
            status, body = raw_request(live, method, template.format(segment.replace("/", "%2f")))
            if status == 200:
                assert json.loads(body)["object"] == "list" and SENTINEL not in body
            else:
                assert_refused(status, body, (400,))
            continue
        status, body = raw_request(live, method, template.format(segment))
        assert_refused(status, body)


HOSTILE_IDS = ["../../etc/passwd", "/etc/passwd", "..", f"{TINY}/../..", f"{TINY}\x00", "\x00", f"{TINY}\n",
               "..\\..\\etc", "\u2025/etc", "\uff0e\uff0e/etc", f"ft:{TINY}::x/../../..", "%2e%2e%2f", "C:\\Windows",
               f"{TINY}:ckpt-step-../../..", "file://etc/passwd", " ", "\t"]


def test_hostile_model_ids_in_bodies(live: Live) -> None:
    fine_tune, checkpoint = live.objects["model"][1:3]
    ids = [*HOSTILE_IDS, f"{fine_tune}/../../..", f"{checkpoint}/..", f"{checkpoint}:ckpt-step-2",
           f"{fine_tune[:-1]}/", checkpoint.replace("ckpt-step-2", "ckpt-step-../2")]
    for model in ids:
        bodies: list[tuple[str, dict[str, Any]]] = [
            ("/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 1}),
            ("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 1}),
            ("/v1/fine_tuning/jobs", {"model": model, "training_file": live.objects["file"][0]}),
        ]
        for path, body in bodies:
            status, raw = raw_request(live, "POST", path, json.dumps(body).encode())
            assert_refused(status, raw, (400, 404))


def test_hostile_file_ids_in_bodies(live: Live) -> None:
    for file_id in [*HOSTILE_IDS, "files/" + live.objects["file"][0] + ".jsonl"]:
        for path in ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/validate"):
            body = {"model": TINY, "training_file": file_id, "validation_file": file_id}
            status, raw = raw_request(live, "POST", path, json.dumps(body).encode())
            if path.endswith("validate") and status == 200:  # the dry run lists the problems
                assert not json.loads(raw)["valid"] and SENTINEL not in raw
            else:
                assert_refused(status, raw, (400,))


# ---- symbolic links planted in the data dir ----


def test_planted_link_as_file_content(live: Live, outside: Path) -> None:
    file_id = upload_training_file(live)
    stored = live.settings.files_dir / f"{file_id}.jsonl"
    stored.unlink()
    stored.symlink_to(outside / "secret.jsonl")
    with live.http() as http:
        response = http.get(f"/v1/files/{file_id}/content")
        assert_refused(response.status_code, response.content, (404,))
        response = http.post("/v1/fine_tuning/jobs/validate", json={"model": TINY, "training_file": file_id})
        assert response.status_code in (200, 404) and SENTINEL not in response.content
        assert http.delete(f"/v1/files/{file_id}").status_code == 200
    assert not stored.is_symlink() and (outside / "secret.jsonl").read_bytes() == SENTINEL + b"\n"


def _completion(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1})


def test_planted_link_as_job_dir(live: Live, outside: Path) -> None:
    from app.services import lifecycle

    job = create_job(live, live.objects["file"][0], "linked")
    model, checkpoint = finish_job(live, job)
    job_dir = live.settings.jobs_dir / job
    moved = outside / f"jobs-{job}"
    shutil.move(job_dir, moved)
    job_dir.symlink_to(moved, target_is_directory=True)
    with live.http() as http:
        for model_id in (model, checkpoint):
            response = _completion(http, model_id)
            assert_refused(response.status_code, response.content, (404,))
        assert http.delete(f"/v1/models/{model}").status_code == 200
    assert (moved / "attempt-0" / "adapter" / "adapter_model.safetensors").is_file()  # the target is untouched
    for call in (lambda: lifecycle.job_dir(live.settings, job), lambda: lifecycle.attempt_dir(live.settings, job, 1)):
        with pytest.raises(PermissionError):
            call()  # a worker would fail the job (storage_error) rather than write outside the data dir


def test_planted_link_inside_adapter_dir(live: Live, outside: Path) -> None:
    job = create_job(live, live.objects["file"][0], "inner")
    model, checkpoint = finish_job(live, job)
    run = live.settings.jobs_dir / job / "attempt-0"
    for directory in (run / "adapter", run / "checkpoint-2"):
        weights = directory / "adapter_model.safetensors"
        copy = outside / f"{job}-{directory.name}.safetensors"
        shutil.move(weights, copy)
        weights.symlink_to(copy)
    with live.http() as http:
        for model_id in (model, checkpoint):
            response = _completion(http, model_id)
            assert_refused(response.status_code, response.content, (404,))


def test_models_import_names(tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`unsloth models import DIR --name NAME`: only ever `<models dir>/NAME`."""
    from app.models_cli import models_main

    source = write_tiny_model(tmp_path / "src" / "model")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    monkeypatch.setenv("UNSLOTH_DATA_DIR", str(data_dir))
    for key in ("UNSLOTH_DATABASE_URL", "UNSLOTH_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    assert models_main(["list"]) == 0
    (data_dir / "models" / "linked-org").symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in outside.iterdir())
    names = ["../evil", "../../evil", str(outside / "evil"), "/tmp/evil", "a/../../evil", "a/b/c", "..", ".",
             "evil\n", "ev\x00il", "evil\\..\\x", "\u2025", "linked-org/evil", "-rf", "a/", "/"]
    for name in names:
        assert models_main(["import", str(source), f"--name={name}"]) == 1, name
    assert sorted(p.name for p in outside.iterdir()) == before
    assert sorted(p.name for p in (data_dir / "models").iterdir()) == ["linked-org"]
    assert models_main(["import", str(source), "--name", "org/ok"]) == 0
    assert (data_dir / "models" / "org" / "ok" / "config.json").is_file()
