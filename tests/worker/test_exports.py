"""The export task's body (`worker.exporting.run_export`) in this process, on real databases, with the real engine
exporting a LoRA adapter on the tiny model: merged and PEFT exports packed as tars that load back, a file that fails
its read-back check, a full disk, a dead worker's attempt reaped and swept, a cancel (once the engine call returned,
and inside it, at the engine's next check) and a lost lease mid-export, and a model deleted before its export ran.
In every failure, nothing of the export is recorded or left on disk."""

from __future__ import annotations

import itertools
import secrets
import shutil
import tarfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select, update

from app.db.base import utcnow
from app.db.models import Export, File, Model
from app.schemas.exports import ExportCreate
from app.services import export_lifecycle, exports, storage
from tests.small_disk import fill, small_disk
from tests.worker.conftest import TINY, WorkerEnv
from worker import exporting


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A LoRA adapter on the tiny base with non-zero B matrices and its tokenizer beside it, as a job's final
    adapter is saved."""
    from unsloth_core.checkpoint import copy_tokenizer_files, load_model
    from unsloth_core.lora import apply_lora, save_adapter

    model = apply_lora(load_model(tiny_base), r=4, alpha=8, seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    out = save_adapter(model, tmp_path_factory.mktemp("adapter") / "final")
    copy_tokenizer_files(tiny_base, out)
    return out


def fine_tune(env: WorkerEnv, adapter: Path) -> str:
    """A fine-tune's model row and adapter directory, where a finished job leaves them."""
    job_id = f"ftjob-test{secrets.token_hex(6)}"
    final = shutil.copytree(adapter, storage.attempt_dir(env.settings, job_id, 0) / "final")
    model_id = f"ft:{TINY}:w:{job_id}"
    with env.ctx.sessions() as session:
        session.add(Model(id=model_id, kind="fine_tune", owner_id=env.key.id, parent=TINY, root=TINY,
                          path=storage.artifact_relative(env.settings, final)))
        session.commit()
    return model_id


def create(env: WorkerEnv, model: str, **body: Any) -> str:
    payload = ExportCreate.model_validate({"model": model, **body})
    with env.ctx.sessions() as session:
        row = exports.create_export(session=session, settings=env.settings, broker=env.broker,  # type: ignore[arg-type]
                                    key=env.key, payload=payload, idempotency_key=None, retry_count=0)
        return row.id


def run(env: WorkerEnv, export_id: str, attempt: int = 0) -> str:
    return exporting.run_export(env.ctx, export_id, attempt, f"test@host/1/2/{secrets.token_hex(4)}")


def export(env: WorkerEnv, export_id: str) -> Export:
    with env.ctx.sessions() as session:
        row = session.get(Export, export_id)
        assert row is not None
        return row


def files_of(env: WorkerEnv, export_id: str) -> list[File]:
    with env.ctx.sessions() as session:
        ids = export(env, export_id).result_files or []
        return list(session.scalars(select(File).where(File.id.in_(ids)).order_by(File.id)))


def assert_nothing_left(env: WorkerEnv, export_id: str) -> None:
    row = export(env, export_id)
    assert row.result_files == [] and row.lease_owner is None
    assert not storage.export_dir(env.settings, export_id).exists()
    with env.ctx.sessions() as session:
        owned = session.scalars(select(File.path).where(File.purpose == "export")).all()
    assert not [p for p in owned if export_id in p]


def unpack(tar_path: Path, into: Path) -> Path:
    with tarfile.open(tar_path) as tar:
        (top,) = {name.split("/", 1)[0] for name in tar.getnames()}
        tar.extractall(into, filter="data")
    return into / top


def test_merged_and_peft_exports_are_tars_that_load_back(env: WorkerEnv, tiny_base: Path, tiny_adapter: Path,
                                                         tmp_path: Path) -> None:
    from unsloth_core.checkpoint import load_model
    from unsloth_core.export_verify import logits_of
    from unsloth_core.lora import load_adapter, strip_lora

    model = fine_tune(env, tiny_adapter)
    merged_id, peft_id = create(env, model, format="merged", quantization="f32"), create(env, model, format="peft")
    assert env.broker.exports_sent[-2:] == [(merged_id, 0), (peft_id, 0)]
    assert run(env, merged_id) == "succeeded" and run(env, peft_id) == "succeeded"
    adapter = load_adapter(load_model(tiny_base, dtype=torch.float32), tiny_adapter)
    ids = list(range(3, 40))

    (merged_tar,) = files_of(env, merged_id)
    assert merged_tar.filename == f"{model.replace(':', '-')}-merged.tar" and merged_tar.purpose == "export"
    merged_dir = unpack(env.settings.data_dir / merged_tar.path, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in merged_dir.iterdir()}
    reference = strip_lora(load_adapter(load_model(tiny_base, dtype=torch.float32), tiny_adapter))
    assert torch.allclose(logits_of(load_model(merged_dir), ids), logits_of(reference, ids), atol=1e-4)
    report = export(env, merged_id).verification
    assert report is not None and report["passed"] and report["adapter_vs_merged"]["passed"]
    assert report["format"] == "merged" and report["greedy_identical"] == report["greedy_probes"]

    (peft_tar,) = files_of(env, peft_id)
    peft_dir = unpack(env.settings.data_dir / peft_tar.path, tmp_path / "peft")
    assert {p.name for p in peft_dir.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                                    "tokenizer.json"}
    reloaded = load_adapter(load_model(tiny_base, dtype=torch.float32), peft_dir)
    assert torch.equal(logits_of(reloaded, ids), logits_of(adapter, ids))
    peft_report = export(env, peft_id).verification
    assert peft_report is not None and peft_report["passed"] and peft_report["tensors_equal"]
    for export_id, tar in ((merged_id, merged_tar), (peft_id, peft_tar)):  # the tar alone: no unpacked copy
        attempt = storage.export_attempt_dir(env.settings, export_id, 0)
        assert [p.name for p in attempt.iterdir()] == [tar.filename]


def test_a_file_that_fails_its_check_fails_the_export_and_leaves_nothing(env: WorkerEnv,
                                                                          tmp_path_factory: pytest.TempPathFactory
                                                                          ) -> None:
    """q4_0 of an untrained model with large random weights: q4_0 rounding flips its near-ties, and its top-1
    agreement falls below the bound (as unsloth_core's own test of the check finds)."""
    from tests.helpers import tiny_model_dir

    link = env.settings.models_dir / "tiny-random"
    if not link.exists():  # a base model the export finds on disk, as an operator installs one
        link.symlink_to(tiny_model_dir(tmp_path_factory.mktemp("random"), seed=3, std=0.5), target_is_directory=True)
    export_id = create(env, "tiny-random", format="gguf", quantization="q4_0")
    assert run(env, export_id) == "failed"
    row = export(env, export_id)
    assert row.error is not None and row.error["code"] == "export_verification_failed"
    assert row.error["param"] == "quantization" and "read-back check" in row.error["message"]
    assert row.verification is not None and row.verification["passed"] is False
    assert row.verification["top1_agreement"] < 0.65 and row.finished_at is not None
    assert_nothing_left(env, export_id)


def test_a_full_disk_fails_the_export_with_storage_full_and_leaves_nothing(env: WorkerEnv,
                                                                          tiny_adapter: Path) -> None:
    model = fine_tune(env, tiny_adapter)
    export_id = create(env, model, format="gguf", quantization="f32", ollama=True)
    with small_disk(env.settings.exports_dir, "4m") as disk:
        fill(disk, leave=32 * 1024)  # the GGUF does not fit
        assert run(env, export_id) == "failed"
        assert sorted(p.name for p in disk.iterdir()) == [".filler"]  # no temporary, no partial file
    row = export(env, export_id)
    assert row.error is not None and row.error["code"] == "storage_full" and "space" in row.error["message"]
    assert_nothing_left(env, export_id)


def expire(env: WorkerEnv, export_id: str) -> None:
    with env.ctx.sessions() as session:
        session.execute(update(Export).where(Export.id == export_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()


def test_a_dead_workers_export_is_requeued_and_its_files_swept(env: WorkerEnv, tiny_adapter: Path) -> None:
    from worker.tasks import reap_exports

    model = fine_tune(env, tiny_adapter)
    export_id = create(env, model, format="gguf", quantization="f16")
    with env.ctx.sessions() as session:  # a worker claims it, starts writing, and dies
        assert export_lifecycle.claim_export(session=session, export_id=export_id, attempt=0, owner="dead") is not None
    torn = storage.export_attempt_dir(env.settings, export_id, 0) / "gguf" / ".model.F16.gguf.part"
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"GGUF half")
    expire(env, export_id)
    with env.ctx.sessions() as session:
        assert reap_exports(session, env.ctx) == 1
    row = export(env, export_id)
    assert (row.status, row.attempt, row.restarts, row.lease_owner) == ("queued", 1, 1, None)
    assert env.broker.exports_sent[-1] == (export_id, 1)
    assert run(env, export_id, attempt=0) == "dropped"  # the dead attempt's message, redelivered
    assert run(env, export_id, attempt=1) == "succeeded"
    assert [p.name for p in storage.export_dir(env.settings, export_id).iterdir()] == ["attempt-1"]
    assert [f.filename for f in files_of(env, export_id)] == ["model.F16.gguf"]

    again = create(env, model, format="gguf", quantization="f16")  # past the restart cap: failed, swept
    with env.ctx.sessions() as session:
        session.execute(update(Export).where(Export.id == again).values(restarts=env.settings.max_job_restarts))
        session.commit()
        assert export_lifecycle.claim_export(session=session, export_id=again, attempt=0, owner="dead") is not None
    storage.export_attempt_dir(env.settings, again, 0).mkdir(parents=True)
    expire(env, again)
    with env.ctx.sessions() as session:
        assert reap_exports(session, env.ctx) == 1
    row = export(env, again)
    assert row.status == "failed" and row.error is not None and row.error["code"] == "worker_lost"
    assert_nothing_left(env, again)


def during_export(monkeypatch: pytest.MonkeyPatch, action: Callable[[str], None]) -> None:
    """Run `action(export id)` once the export is written, before the worker records it."""
    original = exporting.export_artifacts

    def export_artifacts(ctx: Any, row: Export, source: Any, out: Path, *rest: Any) -> Any:
        result = original(ctx, row, source, out, *rest)
        action(row.id)
        return result

    monkeypatch.setattr(exporting, "export_artifacts", export_artifacts)


def test_a_cancel_during_the_export_records_nothing(env: WorkerEnv, tiny_adapter: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    export_id = create(env, fine_tune(env, tiny_adapter), format="peft")

    def cancel(export_id: str) -> None:
        with env.ctx.sessions() as session:
            assert exports.cancel_export(session=session, key=env.key, export_id=export_id).cancel_requested

    during_export(monkeypatch, cancel)
    assert run(env, export_id) == "cancelled"
    assert export(env, export_id).status == "cancelled"
    assert_nothing_left(env, export_id)


def test_a_cancel_while_the_engine_exports_stops_it_at_the_next_check(env: WorkerEnv, tiny_adapter: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled as the read-back check starts, with each probe slowed to make the check outlast the poll: the engine
    stops at the worker's next read of the flag (at most one a second), the export ends cancelled, and nothing of it
    is recorded or left. The heartbeat, which notes a cancel too, is slowed past the export so the poll is what
    sees it."""
    from unsloth_core import export_verify

    monkeypatch.setattr(env.ctx.settings, "heartbeat_s", 60.0)
    export_id = create(env, fine_tune(env, tiny_adapter), format="gguf", quantization="f16")
    probes: list[float] = []
    original_probe = export_verify.teacher_forced

    def slow_probe(*args: Any) -> Any:
        if not probes:
            with env.ctx.sessions() as session:
                assert exports.cancel_export(session=session, key=env.key, export_id=export_id).cancel_requested
        probes.append(time.monotonic())
        time.sleep(0.2)
        return original_probe(*args)

    reads: list[float] = []
    original_read = export_lifecycle.cancel_requested

    def read(**kwargs: Any) -> bool:
        reads.append(time.monotonic())
        return original_read(**kwargs)

    completed: list[str] = []
    original_complete = export_lifecycle.complete_export
    monkeypatch.setattr(export_verify, "teacher_forced", slow_probe)
    monkeypatch.setattr(export_lifecycle, "cancel_requested", read)
    monkeypatch.setattr(export_lifecycle, "complete_export",
                        lambda **kwargs: completed.append(kwargs["export_id"]) or original_complete(**kwargs))
    assert run(env, export_id) == "cancelled"
    assert time.monotonic() - probes[0] < exporting.CANCEL_POLL_S + 1.5  # stopped at the next poll, not the end
    assert not completed and len(probes) < 10  # the engine stopped mid-check: 2 x 5 probes make a whole one
    assert reads and all(b - a >= exporting.CANCEL_POLL_S * 0.99 for a, b in itertools.pairwise(reads))
    row = export(env, export_id)
    assert (row.status, row.error) == ("cancelled", None)
    assert_nothing_left(env, export_id)


def test_a_lost_lease_records_nothing(env: WorkerEnv, tiny_adapter: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export_id = create(env, fine_tune(env, tiny_adapter), format="gguf", quantization="f32")

    def taken_over(export_id: str) -> None:
        with env.ctx.sessions() as session:
            session.execute(update(Export).where(Export.id == export_id).values(lease_owner="another-worker"))
            session.commit()

    during_export(monkeypatch, taken_over)
    assert run(env, export_id) == "lost"
    row = export(env, export_id)
    assert (row.status, row.lease_owner, row.result_files) == ("running", "another-worker", [])
    assert not storage.export_attempt_dir(env.settings, export_id, 0).exists()


def test_a_model_deleted_before_its_export_ran(env: WorkerEnv, tiny_adapter: Path) -> None:
    model = fine_tune(env, tiny_adapter)
    export_id = create(env, model, format="merged")
    with env.ctx.sessions() as session:
        session.execute(update(Model).where(Model.id == model).values(deleted_at=utcnow()))
        session.commit()
    assert run(env, export_id) == "failed"
    row = export(env, export_id)
    assert row.error == {"code": "model_not_found", "param": "model",
                         "message": f"The model '{model}' was deleted before its export ran; nothing was exported."}
    assert_nothing_left(env, export_id)


def test_a_checkpoint_pruned_while_it_is_exported(env: WorkerEnv, tiny_adapter: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Its row and files go as the worker starts reading them: model_not_found, as for a model deleted before."""
    model = fine_tune(env, tiny_adapter)
    export_id = create(env, model, format="merged")
    original = exporting.export_artifacts

    def pruned_first(ctx: Any, row: Export, source: Any, out: Path, *rest: Any) -> Any:
        with env.ctx.sessions() as session:
            session.execute(update(Model).where(Model.id == model).values(deleted_at=utcnow()))
            session.commit()
        shutil.rmtree(source.adapter)
        return original(ctx, row, source, out, *rest)

    monkeypatch.setattr(exporting, "export_artifacts", pruned_first)
    assert run(env, export_id) == "failed"
    row = export(env, export_id)
    assert row.error is not None and (row.error["code"], row.error["param"]) == ("model_not_found", "model")
    assert_nothing_left(env, export_id)
