"""`/v1/exports` over HTTP: create (validated, defaults resolved, idempotent, enqueued by task name after commit,
capped per key), list, retrieve, cancel, delete, ownership; and a real export of a trained tiny adapter run through the
worker's task body, its GGUF downloaded through `/v1/files/{id}/content` (whole, and in ranges) and read back.
`GET /v1/files/{id}/content`'s range requests are tested on an upload too."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.services import storage
from tests.app.conftest import TINY, Backend, FineTune, TrainedRun, chat_rows, jsonl, make_fine_tune, upload

EXPORT_TASK = "worker.tasks.export_model"


def http(backend: Backend, key: str | None = None) -> httpx.Client:
    """A client that says each request is a first try (as the openai SDK does), so identical bodies make new
    exports."""
    headers = {"Authorization": f"Bearer {key or backend.user_key}", "x-stainless-retry-count": "0"}
    return httpx.Client(base_url=backend.base_url + "/v1", headers=headers, timeout=60)


def create(backend: Backend, key: str | None = None, **body: Any) -> httpx.Response:
    with http(backend, key) as h:
        return h.post("/exports", json=body)


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    detail: dict[str, Any] = response.json()["error"]
    return detail


def run_worker(backend: Backend, export_id: str, attempt: int = 0) -> str:
    """What a worker does with the message: the task's body, in this process, on the backend's database."""
    from worker.context import WorkerContext
    from worker.exporting import run_export

    ctx = WorkerContext.build(backend.settings)
    try:
        return run_export(ctx, export_id, attempt, f"test-worker/{secrets.token_hex(4)}")
    finally:
        ctx.close()


# ---- the whole path: create, the worker, download, read back ----


def test_a_gguf_export_runs_on_the_worker_and_downloads_in_ranges(backend: Backend, fine_tune: FineTune,
                                                                   tmp_path: Path) -> None:
    client = backend.client()
    backend.queued_messages()
    made: Any = client.post("/exports", cast_to=object, body={"model": fine_tune.model, "format": "gguf",
                                                               "quantization": "f16", "ollama": True})
    assert made["object"] == "export" and made["id"].startswith("export-") and made["status"] == "queued"
    assert (made["model"], made["quantization"], made["ollama"], made["result_files"]) == (
        fine_tune.model, "f16", True, [])
    assert backend.queued_messages() == [(EXPORT_TASK, [made["id"], 0])]  # by task name, on the gpu queue

    assert run_worker(backend, made["id"]) == "succeeded"
    assert run_worker(backend, made["id"]) == "dropped"  # the same message again: nothing done
    done: Any = client.get(f"/exports/{made['id']}", cast_to=object)
    assert done["status"] == "succeeded" and done["error"] is None and done["finished_at"] >= done["created_at"]
    report = done["verification"]
    assert report["passed"] and report["quantization"] == "f16"
    assert report["greedy_identical"] == report["greedy_probes"]
    assert report["max_abs_logit_diff"] <= 1e-4 and report["adapter_vs_merged"]["passed"]
    gguf_id, modelfile_id = done["result_files"]
    gguf = client.files.retrieve(gguf_id)
    assert (gguf.filename, gguf.purpose, gguf.status) == ("model.F16.gguf", "export", "processed")
    assert client.files.retrieve(modelfile_id).filename == "Modelfile"
    assert client.files.content(modelfile_id).text.startswith("FROM ./model.F16.gguf\n")
    assert gguf.id in [f.id for f in client.files.list(purpose="export")]

    with http(backend) as h:
        whole = h.get(f"/files/{gguf_id}/content")
        assert whole.status_code == 200 and int(whole.headers["content-length"]) == gguf.bytes == len(whole.content)
        assert whole.headers["accept-ranges"] == "bytes" and whole.content[:4] == b"GGUF"
        part = h.get(f"/files/{gguf_id}/content", headers={"Range": "bytes=4-99"})
        assert part.status_code == 206 and part.headers["content-range"] == f"bytes 4-99/{gguf.bytes}"
        assert part.content == whole.content[4:100] and part.headers["content-length"] == "96"
        tail = h.get(f"/files/{gguf_id}/content", headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == whole.content[-10:]
        resumed = h.get(f"/files/{gguf_id}/content", headers={"Range": f"bytes={gguf.bytes - 5}-"})
        assert resumed.status_code == 206 and resumed.content == whole.content[-5:]
    path = tmp_path / "model.F16.gguf"
    path.write_bytes(whole.content)
    assert_same_greedy_tokens(backend, fine_tune, path, tmp_path)

    other = backend.client(backend.other_key)  # another key sees neither the export nor its files
    with pytest.raises(openai.NotFoundError):
        other.get(f"/exports/{made['id']}", cast_to=object)
    with pytest.raises(openai.NotFoundError):
        other.files.content(gguf_id)

    deleted: Any = client.delete(f"/exports/{made['id']}", cast_to=object)
    assert deleted == {"id": made["id"], "object": "export", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.files.content(gguf_id)
    assert not storage.export_dir(backend.settings, made["id"]).exists()


def assert_same_greedy_tokens(backend: Backend, fine_tune: FineTune, gguf: Path, tmp_path: Path) -> None:
    """The downloaded file, read back by our importer, decodes as the adapter served by the API does."""
    import torch

    from unsloth_core.checkpoint import load_model
    from unsloth_core.generate import generate_ids
    from unsloth_core.gguf_import import import_gguf
    from unsloth_core.lora import load_adapter

    base = backend.settings.models_dir / TINY
    with backend.ctx.sessions() as session:
        from app.db.models import Model

        row = session.get(Model, fine_tune.model)
        assert row is not None
        adapter_dir = backend.settings.data_dir / row.path
    adapter = load_adapter(load_model(base, dtype=torch.float32), adapter_dir)
    exported = load_model(import_gguf(gguf, tmp_path / "read-back", progress=False), dtype=torch.float32)
    prompt = torch.tensor([list(b"hello there")])
    ours = generate_ids(adapter, prompt, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(generate_ids(exported, prompt, max_new_tokens=12, eos_token_id=[]), ours)


# ---- create: validation, defaults, ownership ----


def test_defaults_per_format(backend: Backend, fine_tune: FineTune) -> None:
    made = [create(backend, model=fine_tune.model, format=f).json() for f in ("gguf", "merged", "peft")]
    assert [(m["format"], m["quantization"], m["ollama"]) for m in made] == [
        ("gguf", "q8_0", False), ("merged", "bf16", False), ("peft", None, False)]
    checkpoint = create(backend, model=fine_tune.checkpoints[0], format="merged", quantization="f16").json()
    assert (checkpoint["model"], checkpoint["status"]) == (fine_tune.checkpoints[0], "queued")
    for m in [*made, checkpoint]:
        assert cancel(backend, m["id"])["status"] == "cancelled"


def cancel(backend: Backend, export_id: str) -> dict[str, Any]:
    with http(backend) as h:
        body: dict[str, Any] = h.post(f"/exports/{export_id}/cancel").raise_for_status().json()
        return body


def test_bad_input_is_400_naming_the_parameter(backend: Backend, fine_tune: FineTune) -> None:
    unknown = error(create(backend, model=fine_tune.model, format="gguf", quantization="q3_bogus"), 400)
    assert unknown["param"] == "quantization"
    assert "f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0" in unknown["message"]
    k_quant = error(create(backend, model=fine_tune.model, format="gguf", quantization="q4_k_m"), 400)
    assert k_quant["param"] == "quantization" and "llama-quantize" in k_quant["message"]
    mismatch = error(create(backend, model=fine_tune.model, format="merged", quantization="q4_0"), 400)
    assert mismatch["param"] == "quantization" and "f32, f16, bf16" in mismatch["message"]
    assert error(create(backend, model=fine_tune.model, format="peft", quantization="f16"), 400)["param"] == \
        "quantization"
    assert error(create(backend, model=fine_tune.model, format="merged", ollama=True), 400)["param"] == "ollama"
    assert error(create(backend, model=fine_tune.model, format="onnx"), 400)["param"] == "format"
    missing = error(create(backend, model=fine_tune.model), 400)
    assert (missing["param"], missing["code"]) == ("format", "missing_required_parameter")
    assert error(create(backend, model=fine_tune.model, format="gguf", extra=1), 400)["code"] == "unknown_parameter"
    base = error(create(backend, model=TINY, format="peft"), 400)
    assert (base["param"], base["code"]) == ("format", "model_has_no_adapter")


def test_another_keys_model_is_404_as_an_unknown_one(backend: Backend, fine_tune: FineTune) -> None:
    theirs = error(create(backend, backend.other_key, model=fine_tune.model, format="gguf"), 404)
    unknown = error(create(backend, backend.other_key, model="ft:tiny-chat::ftjob-nope", format="gguf"), 404)
    assert (theirs["code"], theirs["param"]) == (unknown["code"], unknown["param"]) == ("model_not_found", "model")
    assert theirs["message"].replace(fine_tune.model, "X") == unknown["message"].replace("ft:tiny-chat::ftjob-nope",
                                                                                            "X")
    checkpoint = error(create(backend, backend.other_key, model=fine_tune.checkpoints[0], format="merged"), 404)
    assert checkpoint["code"] == "model_not_found"


def test_a_modelfile_is_refused_before_any_work_for_a_template_ollama_cannot_take(
        backend: Backend, trained_run: TrainedRun, tmp_path: Path) -> None:
    """The adapter's own tokenizer carries a chat template that is neither ChatML nor Llama 3: no Modelfile."""
    step, final, metrics = trained_run.final
    odd = shutil.copytree(final, tmp_path / "odd")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(backend.settings.models_dir / TINY / name, odd / name)
    (odd / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                             "{% endfor %}")
    ft = make_fine_tune(backend, TrainedRun([(step, odd, metrics)]), backend.user_key, suffix="odd")
    refused = error(create(backend, model=ft.model, format="gguf", ollama=True), 400)
    assert (refused["param"], refused["code"]) == ("ollama", "chat_template_not_translatable")
    assert "ChatML and Llama 3" in refused["message"]
    assert create(backend, model=ft.model, format="gguf").status_code == 200  # without the Modelfile: fine


def test_idempotency_key_and_sdk_retries_make_one_export(backend: Backend, fine_tune: FineTune) -> None:
    body = {"model": fine_tune.model, "format": "merged"}
    with http(backend) as h:
        key = {"Idempotency-Key": secrets.token_hex(8)}
        first = h.post("/exports", json=body, headers=key).json()
        assert h.post("/exports", json=body, headers=key).json()["id"] == first["id"]
        assert error(h.post("/exports", json={**body, "format": "gguf"}, headers=key), 422)["code"] == \
            "idempotency_key_reused"
        fresh = h.post("/exports", json=body).json()  # the SDK's first try (retry count 0): a new export
        assert fresh["id"] != first["id"]
        retried = h.post("/exports", json=body, headers={"x-stainless-retry-count": "1"}).json()
        assert retried["id"] == fresh["id"]  # its retry: the same one
        for export_id in (first["id"], fresh["id"]):
            h.post(f"/exports/{export_id}/cancel").raise_for_status()
        again = h.post("/exports", json=body, headers={"x-stainless-retry-count": "1"}).json()
        assert again["id"] != fresh["id"]  # a cancelled export is not what a retry gets back
        h.post(f"/exports/{again['id']}/cancel").raise_for_status()


def test_list_cancel_delete_and_caps(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    key = backend.new_key()
    made = [create(backend, key, model=TINY, format="gguf", quantization=q).json()["id"]
            for q in ("f16", "q8_0", "f32")]  # a base model: public, exportable by any key
    with http(backend, key) as h:
        first = h.get("/exports", params={"limit": 2}).json()
        assert first["object"] == "list" and [e["id"] for e in first["data"]] == made[:0:-1] and first["has_more"]
        rest = h.get("/exports", params={"limit": 2, "after": first["last_id"]}).json()
        assert [e["id"] for e in rest["data"]] == made[:1] and not rest["has_more"]
        assert h.get("/exports", params={"model": "nope"}).json()["data"] == []

        busy = error(h.delete(f"/exports/{made[0]}"), 400)
        assert busy["code"] == "export_in_progress"
        cancelled = h.post(f"/exports/{made[0]}/cancel").json()
        assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
        assert h.post(f"/exports/{made[0]}/cancel").json()["status"] == "cancelled"  # again: the same answer
        assert h.delete(f"/exports/{made[0]}").json()["deleted"] is True
        assert error(h.get(f"/exports/{made[0]}"), 404)["code"] == "export_not_found"
        assert error(h.post(f"/exports/{made[0]}/cancel"), 404)["code"] == "export_not_found"

        monkeypatch.setattr(backend.settings, "max_active_exports_per_key", 3)
        create(backend, key, model=TINY, format="merged").raise_for_status()  # 3 queued now
        capped = create(backend, key, model=TINY, format="merged")
        assert error(capped, 429)["code"] == "too_many_active_exports" and capped.headers["retry-after"]
        monkeypatch.setattr(backend.settings, "max_exports_per_key", 3)
        for e in h.get("/exports").json()["data"]:
            h.post(f"/exports/{e['id']}/cancel").raise_for_status()
        full = create(backend, key, model=TINY, format="merged")
        assert error(full, 429)["code"] == "insufficient_quota" and full.headers["x-should-retry"] == "false"


def test_a_finished_export_cannot_be_cancelled(backend: Backend, fine_tune: FineTune) -> None:
    made = create(backend, model=fine_tune.model, format="peft").json()
    assert run_worker(backend, made["id"]) == "succeeded"
    with http(backend) as h:
        assert error(h.post(f"/exports/{made['id']}/cancel"), 400)["code"] == "export_not_cancellable"
        done = h.get(f"/exports/{made['id']}").json()
        assert done["verification"]["passed"] and done["verification"]["format"] == "peft"
        (tar_id,) = done["result_files"]
        assert h.get(f"/files/{tar_id}").json()["filename"] == f"{fine_tune.model.replace(':', '-')}-peft.tar"


# ---- /v1/files/{id}/content: streamed, Content-Length, ranges ----


def test_file_content_answers_ranges(backend: Backend) -> None:
    content = jsonl(chat_rows(12))
    file_id = upload(backend.client(), content).id
    size = len(content)
    with http(backend) as h:
        url = f"/files/{file_id}/content"
        whole = h.get(url)
        assert (whole.status_code, whole.content, whole.headers["content-length"]) == (200, content, str(size))
        assert h.get(url, headers={"Range": "bytes=0-0"}).content == content[:1]
        over = h.get(url, headers={"Range": "bytes=5-999999"})  # an end past the file is cut to it
        assert over.status_code == 206 and over.headers["content-range"] == f"bytes 5-{size - 1}/{size}"
        assert over.content == content[5:]
        several = h.get(url, headers={"Range": "bytes=0-1, 10-12"})
        assert several.status_code == 206 and several.headers["content-type"].startswith("multipart/byteranges")
        outside = h.get(url, headers={"Range": f"bytes={size}-"})
        detail = error(outside, 416)
        assert (detail["code"], detail["param"]) == ("range_not_satisfiable", "Range")
        assert outside.headers["content-range"] == f"bytes */{size}"
        for malformed in ("lines=0-3", "bytes=abc", "bytes=9-3"):  # ignored: the whole file
            ignored = h.get(url, headers={"Range": malformed})
            assert (ignored.status_code, ignored.content) == (200, content), malformed


# ---- the contract: the OpenAPI document, and the engine's list of types ----


def test_the_openapi_document_has_the_export_routes_and_their_errors(backend: Backend) -> None:
    document = httpx.get(f"{backend.base_url}/openapi.json").json()
    paths = document["paths"]
    assert (set(paths["/v1/exports"]), set(paths["/v1/exports/{export_id}"])) == ({"get", "post"}, {"get", "delete"})
    create_op = paths["/v1/exports"]["post"]
    assert {"200", "400", "401", "404", "422", "429", "507"} <= set(create_op["responses"])
    assert "409" in paths["/v1/exports/{export_id}/cancel"]["post"]["responses"]
    assert "404" in paths["/v1/exports/{export_id}"]["delete"]["responses"]
    body = document["components"]["schemas"]["ExportCreate"]
    assert set(body["required"]) == {"model", "format"}
    quantization = next(s for s in body["properties"]["quantization"]["anyOf"] if "enum" in s)
    assert quantization["enum"] == ["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
    content = paths["/v1/files/{file_id}/content"]["get"]
    assert {"200", "206", "416"} <= set(content["responses"])
    assert content["responses"]["416"]["headers"]["Content-Range"]["required"]
    assert any(p["name"] == "Range" and p["in"] == "header" for p in content["parameters"])


def test_the_api_lists_the_types_the_engine_writes() -> None:
    from app.schemas.exports import GGUF_TYPES
    from unsloth_core.export_gguf import QUANTIZATIONS

    assert GGUF_TYPES == QUANTIZATIONS
