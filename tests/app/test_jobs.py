"""`/v1/fine_tuning/jobs` through the openai SDK: create (validated, resolved, idempotent, enqueued after commit),
list with paging and metadata, retrieve, cancel / pause / resume, events (paged and live), checkpoints, the dry-run,
re-sending lost messages, and ownership."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.db.base import utcnow
from app.services import dispatch, lifecycle
from tests.app.conftest import TINY, Backend, FineTune, chat_rows, jsonl, upload

TRAIN = "worker.tasks.train"


def preference_file(client: openai.OpenAI) -> str:
    from unsloth_core.data.synthetic import made_up_facts, preference_rows

    return str(upload(client, jsonl(preference_rows(made_up_facts(12)))).id)


def test_create_resolves_echoes_and_enqueues_after_commit(backend: Backend, training_file: str) -> None:
    client = backend.client()
    backend.queued_messages()
    method: Any = {"type": "supervised", "supervised": {"hyperparameters": {  # extensions beside OpenAI's keys
        "n_epochs": 2, "lora_r": 8, "lr_scheduler": "cosine", "packing": True}}}
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, suffix="my-model", seed=7,
                                         metadata={"team": "a"}, method=method)
    assert (job.object, job.status, job.model, job.seed, job.metadata) == ("fine_tuning.job", "queued", TINY, 7,
                                                                           {"team": "a"})
    hp = job.method.supervised.hyperparameters.model_dump()  # type: ignore[union-attr]
    assert hp["n_epochs"] == 2 and hp["lora_r"] == 8 and hp["lr_scheduler"] == "cosine" and hp["packing"] is True
    assert "auto" not in json.dumps(hp)  # every "auto" resolved and echoed
    assert hp["batch_size"] == 1 and hp["learning_rate_multiplier"] == 1.0 and hp["lora_alpha"] == 8
    assert job.hyperparameters.n_epochs == 2  # the legacy mirror
    assert backend.queued_messages() == [(TRAIN, [job.id, 0])]
    again = client.fine_tuning.jobs.retrieve(job.id)
    assert again.model_dump() == job.model_dump()


def test_legacy_hyperparameters_and_absolute_learning_rate(backend: Backend, training_file: str) -> None:
    client = backend.client()
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, hyperparameters={"n_epochs": 4})
    assert job.method.type == "supervised" and job.method.supervised.hyperparameters.n_epochs == 4  # type: ignore[union-attr]
    method: Any = {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate": 1e-4}}}
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, method=method)
    hp = job.method.supervised.hyperparameters.model_dump()  # type: ignore[union-attr]
    assert hp["learning_rate"] == 1e-4 and hp["learning_rate_multiplier"] == pytest.approx(0.5)


def test_dpo_job(backend: Backend) -> None:
    client = backend.client()
    job = client.fine_tuning.jobs.create(model=TINY, training_file=preference_file(client),
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2  # type: ignore[union-attr]


def test_list_pages_with_after_and_filters_by_metadata(backend: Backend) -> None:
    key = backend.new_key()
    client = backend.client(key)
    file_id = upload(client, jsonl(chat_rows(12))).id
    made = [client.fine_tuning.jobs.create(model=TINY, training_file=file_id, seed=i,
                                           metadata={"batch": "odd" if i % 2 else "even"}).id for i in range(5)]
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == made[:-3:-1] and first.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == made[::-1]  # three pages via `after`
    odd = client.fine_tuning.jobs.list(metadata={"batch": "odd"})
    assert [j.id for j in odd.data] == [made[3], made[1]]


def test_idempotency_key_makes_one_job(backend: Backend, training_file: str) -> None:
    client = backend.client()
    backend.queued_messages()
    headers = {"Idempotency-Key": "create-once-" + backend.name + training_file}
    first = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, extra_headers=headers)
    retry = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, extra_headers=headers)
    assert retry.id == first.id
    assert backend.queued_messages() == [(TRAIN, [first.id, 0])]
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.fine_tuning.jobs.create(model=TINY, training_file=training_file, seed=1, extra_headers=headers)
    assert e.value.code == "idempotency_key_reused"
    other = backend.client(backend.other_key)  # keys are scoped per API key
    other_file = upload(other, jsonl(chat_rows(12))).id
    assert other.fine_tuning.jobs.create(model=TINY, training_file=other_file, extra_headers=headers).id != first.id


def test_sdk_retry_without_a_key_is_deduplicated(backend: Backend, training_file: str) -> None:
    client = backend.client()
    first = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, suffix="retry")
    # What the SDK sends when it retries a POST whose answer it never saw (timeout, 5xx, 429).
    retried = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, suffix="retry",
                                             extra_headers={"x-stainless-retry-count": "1"})
    assert retried.id == first.id
    fresh = client.fine_tuning.jobs.create(model=TINY, training_file=training_file, suffix="retry")
    assert fresh.id != first.id  # a first attempt is a new request, even with the same body


@pytest.mark.parametrize(("kwargs", "param", "code"), [
    ({"model": "no-such-model"}, "model", "model_not_found"),
    ({"training_file": "file-doesnotexist"}, "training_file", "file_not_found"),
    ({"validation_file": "file-doesnotexist"}, "validation_file", "file_not_found"),
    ({"suffix": "bad:suffix"}, "suffix", "invalid_value"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "invalid_value"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_rank": 8}}}},
     "method.supervised.hyperparameters.lora_rank", "unknown_parameter"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"lora_r": 100000}}}},
     "method.supervised.hyperparameters.lora_r", "invalid_value"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"max_seq_length": 4096}}}},
     "method.supervised.hyperparameters.max_seq_length", "invalid_value"),
    ({"method": {"type": "dpo"}}, "training_file", "wrong_purpose"),
    ({"method": {"type": "reinforcement"}}, "method.reinforcement", "missing_required_parameter"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "invalid_value"),
])
def test_create_errors_name_the_parameter(backend: Backend, training_file: str, kwargs: dict[str, Any], param: str,
                                         code: str) -> None:
    body = {"model": TINY, "training_file": training_file, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        backend.client().fine_tuning.jobs.create(**body)
    assert (e.value.param, e.value.code) == (param, code)


def test_missing_field_is_400_with_param(backend: Backend) -> None:
    r = httpx.post(f"{backend.base_url}/v1/fine_tuning/jobs", json={"model": TINY},
                   headers={"Authorization": f"Bearer {backend.user_key}"})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "Missing required parameter: 'training_file'.",
                                  "type": "invalid_request_error", "param": "training_file",
                                  "code": "missing_required_parameter"}}


def test_another_keys_file_is_not_found(backend: Backend) -> None:
    theirs = upload(backend.client(backend.other_key), jsonl(chat_rows(12))).id
    with pytest.raises(openai.BadRequestError) as e:
        backend.client().fine_tuning.jobs.create(model=TINY, training_file=theirs)
    assert (e.value.param, e.value.code) == ("training_file", "file_not_found")


def test_cancel_pause_resume_a_queued_job(backend: Backend, training_file: str) -> None:
    jobs = backend.client().fine_tuning.jobs
    job = jobs.create(model=TINY, training_file=training_file)
    backend.queued_messages()
    assert jobs.pause(job.id).status == "paused"
    assert jobs.pause(job.id).status == "paused"
    resumed = jobs.resume(job.id)
    assert resumed.status == "queued"
    assert backend.queued_messages() == [(TRAIN, [job.id, 1])]  # a new attempt: the old message cannot claim it
    with backend.ctx.sessions() as session:
        assert lifecycle.claim_job(session=session, job_id=job.id, attempt=0, owner="stale") is None
    with pytest.raises(openai.BadRequestError) as e:
        jobs.resume(job.id)
    assert e.value.code == "job_not_paused"
    cancelled = jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert jobs.cancel(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as e:
        jobs.pause(job.id)
    assert e.value.code == "job_not_pausable"
    with backend.ctx.sessions() as session:
        assert lifecycle.claim_job(session=session, job_id=job.id, attempt=1, owner="late") is None
    transitions = [e.data for e in reversed(list(jobs.list_events(job.id, limit=100))) if e.data]
    assert transitions == [{"status": "paused", "attempt": 0}, {"status": "queued", "attempt": 1},
                           {"status": "cancelled", "attempt": 1}]  # every transition, the terminal one once


def test_a_running_job_gets_stop_requests(backend: Backend, training_file: str) -> None:
    jobs = backend.client().fine_tuning.jobs
    job = jobs.create(model=TINY, training_file=training_file)
    with backend.ctx.sessions() as session:
        assert lifecycle.claim_job(session=session, job_id=job.id, attempt=0, owner="w1") is not None
    paused = jobs.pause(job.id)
    assert (paused.status, paused.model_extra["stop_requested"]) == ("running", "pause")  # type: ignore[index]
    resumed = jobs.resume(job.id)  # withdrawn before the worker acted on it
    assert (resumed.status, resumed.model_extra["stop_requested"]) == ("running", None)  # type: ignore[index]
    cancelling = jobs.cancel(job.id)
    assert (cancelling.status, cancelling.model_extra["stop_requested"]) == ("running", "cancel")  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        jobs.pause(job.id)


def test_finished_job_cannot_be_cancelled(backend: Backend, fine_tune: FineTune) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        backend.client().fine_tuning.jobs.cancel(fine_tune.job_id)
    assert e.value.code == "job_not_cancellable"


def test_events_newest_first_with_paging(backend: Backend, training_file: str) -> None:
    jobs = backend.client().fine_tuning.jobs
    job = jobs.create(model=TINY, training_file=training_file)
    jobs.pause(job.id)
    jobs.resume(job.id)
    jobs.cancel(job.id)
    page = jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more and page.data[0].object == "fine_tuning.job.event"
    messages = [e.message for e in jobs.list_events(job.id, limit=2)]
    assert messages[0] == "Fine-tuning job cancelled" and messages[-1].startswith("Created fine-tuning job")
    assert len(messages) == 5


def test_events_stream_live_until_the_job_ends(backend: Backend, training_file: str) -> None:
    jobs = backend.client().fine_tuning.jobs
    job = jobs.create(model=TINY, training_file=training_file)
    url = f"{backend.base_url}/v1/fine_tuning/jobs/{job.id}/events?stream=true"
    received: list[Any] = []
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {backend.user_key}"}, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                received.append(line.removeprefix("data: "))
            if len(received) == 2:  # the two creation events are there; now make a live one
                threading.Thread(target=jobs.cancel, args=(job.id,)).start()
            if received and received[-1] == "[DONE]":
                break
    events = [json.loads(x) for x in received[:-1]]
    assert [e["message"] for e in events] == ["Created fine-tuning job: " + job.id,
                                              "Files validated, moving job to queued state",
                                              "Fine-tuning job cancelled"]


def test_checkpoints_with_metrics_and_paging(backend: Backend, fine_tune: FineTune) -> None:
    checkpoints = backend.client().fine_tuning.jobs.checkpoints
    first = checkpoints.list(fine_tune.job_id, limit=1)
    assert first.has_more and first.data[0].step_number == 4
    every = list(checkpoints.list(fine_tune.job_id, limit=1))
    assert [c.step_number for c in every] == [4, 2]
    assert [c.fine_tuned_model_checkpoint for c in every] == fine_tune.checkpoints[::-1]
    assert every[0].fine_tuning_job_id == fine_tune.job_id and every[0].metrics.train_loss is not None
    job = backend.client().fine_tuning.jobs.retrieve(fine_tune.job_id)
    assert (job.status, job.fine_tuned_model, job.trained_tokens) == ("succeeded", fine_tune.model, 1234)
    messages = [e.message for e in backend.client().fine_tuning.jobs.list_events(fine_tune.job_id, limit=100)]
    assert "The job has successfully completed" in messages and "Checkpoint saved at step 4" in messages


def test_dry_run_reports_before_anything_is_queued(backend: Backend, training_file: str) -> None:
    client = backend.client()
    backend.queued_messages()
    body = {"model": TINY, "training_file": training_file,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"max_seq_length": 64}}}}
    report = client.post("/fine_tuning/jobs/validate", body=body, cast_to=httpx.Response).json()
    assert report["valid"] and report["errors"] == []
    assert report["n_examples"] == 12 and report["n_tokens"] > 0 and report["n_truncated"] > 0
    assert report["estimated_steps"] == 12 * report["method"]["supervised"]["hyperparameters"]["n_epochs"]
    from tests.app.test_files import BROKEN

    broken = upload(client, BROKEN).id
    report = client.post("/fine_tuning/jobs/validate", body={**body, "training_file": broken, "model": "nope"},
                         cast_to=httpx.Response).json()
    assert not report["valid"]
    assert {(e["param"], e["code"], e["line"]) for e in report["errors"]} >= {
        ("model", "model_not_found", None), ("training_file", "invalid_json", 3),
        ("training_file", "no_assistant_message", 4), ("training_file", "unrecognized_role", 6)}
    assert backend.queued_messages() == []


def test_lost_messages_are_sent_again(backend: Backend, training_file: str) -> None:
    job = backend.client().fine_tuning.jobs.create(model=TINY, training_file=training_file)
    backend.queued_messages()  # the message is lost
    settings, broker = backend.settings, backend.ctx.broker
    with backend.ctx.sessions() as session:
        assert job.id not in dispatch.resend_unclaimed(session=session, broker=broker)  # too soon
        later = utcnow() + timedelta(seconds=settings.resend_after_s + 1)
        assert job.id in dispatch.resend_unclaimed(session=session, broker=broker, now=later)
        assert job.id not in dispatch.resend_unclaimed(session=session, broker=broker, now=later)
    assert (TRAIN, [job.id, 0]) in backend.queued_messages()


def test_the_resender_never_starves_a_due_job_behind_ones_backing_off(backend: Backend, tmp_path: Path) -> None:
    """Issue 15: the re-send loop read the first 100 queued jobs by id and filtered their back-off in Python, so 100
    older jobs backing off hid every newer one. It now asks the database for due jobs, the longest overdue first
    (here with a page of 2 behind 5 older jobs)."""
    from sqlalchemy.orm import Session as DbSession

    from app.db.base import Base
    from app.db.models import ApiKey, Job
    from app.db.session import make_engine

    class Recorder:
        settings = backend.settings

        def __init__(self) -> None:
            self.sent: list[str] = []

        def send_train(self, job_id: str, attempt: int) -> None:
            self.sent.append(job_id)

    engine = make_engine(f"sqlite:///{tmp_path / 'resend.db'}")
    Base.metadata.create_all(engine)
    now, after = utcnow(), timedelta(seconds=backend.settings.resend_after_s)
    broker = Recorder()
    with DbSession(engine) as session:
        session.add(ApiKey(id="key-1", name="k", prefix="sk-", key_hash="h", is_admin=False, source="cli"))
        for i in range(5):  # older: sent six times, backing off for 32 x resend_after_s
            session.add(Job(id=f"ftjob-{i}", owner_id="key-1", model="m", training_file="f", seed=0, method={},
                            request_hash="x", status="queued", enqueued_at=now - 2 * after, send_count=6,
                            resend_at=now + 30 * after))
        session.add(Job(id="ftjob-9", owner_id="key-1", model="m", training_file="f", seed=0, method={},
                        request_hash="x", status="queued", enqueued_at=now - 2 * after, send_count=1,
                        resend_at=now - after))
        session.commit()
        due = dispatch.resend_unclaimed(session=session, broker=broker, now=now, limit=2)  # type: ignore[arg-type]
        assert due == ["ftjob-9"]
        assert broker.sent == ["ftjob-9"]
        job = session.get(Job, "ftjob-9")
        assert job is not None and job.send_count == 2 and job.resend_at is not None
        assert job.resend_at - job.enqueued_at == 2 * after  # type: ignore[operator]  # the back-off doubles
    engine.dispose()


def test_other_keys_jobs_are_invisible(backend: Backend, training_file: str) -> None:
    job = backend.client().fine_tuning.jobs.create(model=TINY, training_file=training_file)
    other = backend.client(backend.other_key).fine_tuning.jobs
    for call in (other.retrieve, other.cancel, other.pause, other.resume, other.list_events, other.checkpoints.list):
        with pytest.raises(openai.NotFoundError) as e:
            call(job.id)
        assert e.value.code == "job_not_found"
    assert job.id not in [j.id for j in other.list(limit=100).data]


def test_a_key_cannot_queue_jobs_without_end(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: one key's queued, running and paused jobs are capped (429 too_many_active_jobs); a cancelled one
    frees its place, and other keys are not counted."""
    monkeypatch.setattr(backend.ctx, "settings", backend.settings.model_copy(update={"max_active_jobs_per_key": 2}))
    key = backend.new_key()
    client = backend.client(key)
    file_id = upload(client, jsonl(chat_rows(12))).id
    first = client.fine_tuning.jobs.create(model=TINY, training_file=file_id, suffix="a")
    client.fine_tuning.jobs.create(model=TINY, training_file=file_id, suffix="b")
    with pytest.raises(openai.RateLimitError) as e:
        client.fine_tuning.jobs.create(model=TINY, training_file=file_id, suffix="c")
    assert e.value.code == "too_many_active_jobs" and e.value.response.headers["retry-after"] == "60"
    client.fine_tuning.jobs.cancel(first.id)
    assert client.fine_tuning.jobs.create(model=TINY, training_file=file_id, suffix="d").status == "queued"
    other = backend.client(backend.new_key())  # two active jobs of its own: not counted against the first key's
    other_file = upload(other, jsonl(chat_rows(12))).id
    assert [other.fine_tuning.jobs.create(model=TINY, training_file=other_file, suffix=s).status
            for s in ("e", "f")] == ["queued", "queued"]
    backend.queued_messages()  # this test's messages: no worker here


def test_a_finished_jobs_result_files_are_readable(backend: Backend, fine_tune: FineTune) -> None:
    client = backend.client(fine_tune.key)
    job = client.fine_tuning.jobs.retrieve(fine_tune.job_id)
    assert len(job.result_files) == 2
    files = {f.filename: f for f in (client.files.retrieve(i) for i in job.result_files)}
    csv_name, manifest_name = f"{job.id}-step_metrics.csv", f"{job.id}-manifest.json"
    assert set(files) == {csv_name, manifest_name}
    assert all(f.purpose == "fine-tune-results" for f in files.values())
    assert client.files.content(files[csv_name].id).text.startswith("step")
    assert json.loads(client.files.content(files[manifest_name].id).text)["job_id"] == job.id
    assert fine_tune.job_id not in {j.id for j in backend.client(backend.other_key).fine_tuning.jobs.list()}
    with pytest.raises(openai.NotFoundError):  # another key's result files are not theirs
        backend.client(backend.other_key).files.content(files[csv_name].id)
