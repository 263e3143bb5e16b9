"""End to end on PostgreSQL + Redis, with compose's processes (API, training worker, housekeeping): a fine-tune from
upload to completions, cancel, pause and resume, and files or models that disappear. (Killed, frozen and stopped
workers, duplicate deliveries and broker or database outages are tests/chaos's.)"""

from __future__ import annotations

import shutil
from typing import Any

from tests.e2e.conftest import (
    TINY,
    Stack,
    all_events,
    create_job,
    metric_steps,
    progress,
    status_events,
    trained_steps,
    upload_facts,
)


def test_fine_tune_from_upload_to_completions(pg_stack: Stack) -> None:
    client = pg_stack.client()
    job_id = create_job(client, upload_facts(client, 12), n_epochs=2, n_checkpoints=3)  # 12 steps
    job = pg_stack.wait_status(job_id, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{TINY}::{job_id}" and job.trained_tokens and job.trained_tokens > 0
    events = all_events(client, job_id)
    assert metric_steps(events) == list(range(1, 13))
    assert status_events(events) == ["running", "succeeded"]
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job_id))
    assert sorted(c.step_number for c in checkpoints) == [4, 8, 12]
    assert all("train_loss" in (c.metrics.model_dump(exclude_none=True)) for c in checkpoints)
    models = {m.id for m in client.models.list()}
    assert job.fine_tuned_model in models and all(c.fine_tuned_model_checkpoint in models for c in checkpoints)
    for model in (job.fine_tuned_model, min(checkpoints, key=lambda c: c.step_number).fine_tuned_model_checkpoint):
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=8, temperature=0)
        assert chat.model == model and chat.usage is not None and chat.usage.completion_tokens > 0
    export_and_download(pg_stack, job.fine_tuned_model)


def export_and_download(stack: Stack, model: str) -> None:
    """The fine-tune exported to GGUF by the training worker (sent by task name to its queue), downloaded whole and
    resumed from the middle."""
    client = stack.client()
    made: Any = client.post("/exports", cast_to=object, body={"model": model, "format": "gguf", "quantization": "f16",
                                                               "ollama": True})

    def done() -> Any:
        export: Any = client.get(f"/exports/{made['id']}", cast_to=object)
        return export if export["status"] in ("succeeded", "failed", "cancelled") else None

    export = stack.wait(done, 120, f"export {made['id']} to end", interval=0.2)
    assert export["status"] == "succeeded" and export["verification"]["passed"], export["error"]
    gguf_id, modelfile_id = export["result_files"]
    whole = client.files.content(gguf_id).content
    assert whole[:4] == b"GGUF" and len(whole) == client.files.retrieve(gguf_id).bytes
    rest = client.with_options(default_headers={"Range": f"bytes={len(whole) // 2}-"}).files.content(gguf_id)
    assert rest.response.status_code == 206 and rest.content == whole[len(whole) // 2:]
    assert client.files.content(modelfile_id).text.startswith("FROM ./model.F16.gguf")


def test_cancel_stops_within_two_steps_and_the_worker_takes_the_next_job(pg_stack: Stack) -> None:
    client = pg_stack.client()
    long_job = create_job(client, upload_facts(client, 400), batch_size=1)  # 400 steps: cancelled long before
    next_job = create_job(client, upload_facts(client, 4))
    trained_steps(pg_stack, long_job, 3)
    cancelling = client.fine_tuning.jobs.cancel(long_job)
    at_cancel = int(getattr(cancelling, "progress", {})["step"])  # the last step recorded at the cancel's commit
    assert pg_stack.wait_status(long_job, ("cancelled",), timeout=30).status == "cancelled"
    assert max(metric_steps(all_events(client, long_job))) <= at_cancel + 2
    assert pg_stack.wait_status(next_job, ("succeeded",)).status == "succeeded"


def test_pause_then_resume_finishes_from_the_checkpoint(pg_stack: Stack) -> None:
    client = pg_stack.client()
    job_id = create_job(client, upload_facts(client, 80), batch_size=1, n_checkpoints=1)  # 80 steps, 1 checkpoint
    trained_steps(pg_stack, job_id, 3)
    client.fine_tuning.jobs.pause(job_id)
    pg_stack.wait_status(job_id, ("paused",), timeout=30)
    step = progress(client, job_id)["step"]
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job_id))
    assert [c.step_number for c in checkpoints] == [step]  # the pause's checkpoint
    client.fine_tuning.jobs.resume(job_id)
    assert pg_stack.wait_status(job_id, ("succeeded", "failed")).status == "succeeded"
    events = all_events(client, job_id)
    assert metric_steps(events) == list(range(1, 81))  # nothing trained twice
    assert any(e.message == f"Resuming from the checkpoint at step {step}" for e in events)
    assert status_events(events) == ["running", "paused", "queued", "running", "succeeded"]


def test_a_file_or_model_gone_mid_way_fails_with_a_code(pg_stack: Stack) -> None:
    client = pg_stack.client()
    doomed_model = "tiny-doomed"
    shutil.copytree(pg_stack.data_dir / "models" / TINY, pg_stack.data_dir / "models" / doomed_model)
    training_file, other_file = upload_facts(client, 40), upload_facts(client, 40, seed=1)
    jobs = {"file": create_job(client, training_file, batch_size=1, n_checkpoints=1),
            "model": create_job(client, other_file, model=doomed_model, batch_size=1, n_checkpoints=1)}
    for job_id in jobs.values():  # each trains a little, pauses at a checkpoint, then loses what it needs
        trained_steps(pg_stack, job_id, 2)
        client.fine_tuning.jobs.pause(job_id)
        pg_stack.wait_status(job_id, ("paused",), timeout=30)
    (pg_stack.data_dir / "files" / f"{training_file}.jsonl").unlink()
    shutil.rmtree(pg_stack.data_dir / "models" / doomed_model)
    for job_id in jobs.values():
        client.fine_tuning.jobs.resume(job_id)
    codes = {what: pg_stack.wait_status(job_id, ("failed", "succeeded")).error for what, job_id in jobs.items()}
    assert codes["file"] is not None and (codes["file"].code, codes["file"].param) == ("file_unreadable",
                                                                                       "training_file")
    assert codes["model"] is not None and (codes["model"].code, codes["model"].param) == ("model_not_found", "model")
    models = {m.id for m in client.models.list()}
    for job_id in jobs.values():  # nothing else touched: its checkpoint stays, no fine-tune appears
        checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job_id))
        assert len(checkpoints) == 1 and checkpoints[0].fine_tuned_model_checkpoint in models
        assert client.fine_tuning.jobs.retrieve(job_id).fine_tuned_model is None
        assert status_events(all_events(client, job_id)) == ["running", "paused", "queued", "running", "failed"]
    assert TINY in models and (pg_stack.data_dir / "files" / f"{other_file}.jsonl").is_file()  # the others stay
