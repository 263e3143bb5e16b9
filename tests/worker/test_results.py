"""A finished job's result files: the step-metrics CSV (its rows are the job's metrics events) and the
reproducibility manifest, from which a new job trains the same adapter bit for bit on the CPU."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import secrets
from typing import Any

import pytest

from app.db.models import File
from app.schemas.jobs import JobCreate
from app.services import jobs
from tests.worker.conftest import TINY, WorkerEnv, fact_rows
from tests.worker.test_training import assert_same, final_adapter, run


def result_files(env: WorkerEnv, job_id: str) -> dict[str, bytes]:
    job = env.job(job_id)
    out = {}
    with env.ctx.sessions() as session:
        for file_id in job.result_files or []:
            row = session.get(File, file_id)
            assert row is not None and row.purpose == "fine-tune-results" and row.owner_id == job.owner_id
            data = (env.settings.data_dir / row.path).read_bytes()
            assert row.bytes == len(data) and row.sha256 == hashlib.sha256(data).hexdigest()
            out[row.filename.split("-", 2)[-1]] = data
    return out


def test_csv_rows_are_the_metrics_events_and_the_manifest_reproduces_the_job(env: WorkerEnv) -> None:
    job_id = env.create_job(env.upload(fact_rows(8)), n_checkpoints=2)
    row = env.job(job_id)
    assert run(env, job_id) == "succeeded"
    files = result_files(env, job_id)
    assert set(files) == {"step_metrics.csv", "manifest.json"}
    table = list(csv.DictReader(io.StringIO(files["step_metrics.csv"].decode())))
    events = [e.data for e in env.events(job_id) if e.type == "metrics" and e.data and "checkpoint" not in e.data]
    assert [int(r["step"]) for r in table] == [e["step"] for e in events] == [1, 2, 3, 4]
    for line, event in zip(table, events):
        assert float(line["train_loss"]) == event["train_loss"]  # repr of a float reads back exactly
        assert float(line["learning_rate"]) == event["learning_rate"]
    assert list(table[0])[:2] == ["step", "train_loss"]

    manifest: dict[str, Any] = json.loads(files["manifest.json"])
    assert manifest["job_id"] == job_id and manifest["request"]["seed"] == row.seed
    assert "auto" not in json.dumps(manifest["request"]["method"])
    assert manifest["data"]["training_file"]["sha256"] == row_sha(env, row.training_file)
    assert manifest["base_model"]["files"]["model.safetensors"]
    assert manifest["software"]["torch"] and manifest["device"]["type"] == "cpu"

    again = JobCreate.model_validate(manifest["request"])
    with env.ctx.sessions() as session:
        rerun = jobs.create_job(session=session, settings=env.settings, broker=env.broker,  # type: ignore[arg-type]
                                key=env.key, payload=again, idempotency_key=secrets.token_hex(8), retry_count=0).id
    assert run(env, rerun) == "succeeded"
    assert_same(final_adapter(env, rerun), final_adapter(env, job_id))  # the same bits from the manifest


def row_sha(env: WorkerEnv, file_id: str) -> str:
    with env.ctx.sessions() as session:
        row = session.get(File, file_id)
        assert row is not None
        return row.sha256


def test_each_checkpoint_carries_its_full_validation_loss(env: WorkerEnv) -> None:
    """Recomputed here from the checkpoint's own weights with the trainer's evaluation: the same number."""
    from unsloth_core.checkpoint import load_model
    from unsloth_core.finetune import prepare_datasets
    from unsloth_core.lora import adapter_state_dict, load_adapter
    from unsloth_core.tokenizer import Tokenizer
    from unsloth_core.trainer import Trainer

    hp = {"n_epochs": 1, "batch_size": 2, "learning_rate": 5e-3, "lora_r": 4, "n_checkpoints": 2,
          "max_seq_length": 128}
    payload = JobCreate.model_validate({
        "model": TINY, "training_file": env.upload(fact_rows(8)), "validation_file": env.upload(fact_rows(4, seed=3)),
        "seed": 7, "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}})
    with env.ctx.sessions() as session:
        job_id = jobs.create_job(session=session, settings=env.settings, broker=env.broker,  # type: ignore[arg-type]
                                 key=env.key, payload=payload, idempotency_key=secrets.token_hex(8),
                                 retry_count=0).id
    assert run(env, job_id) == "succeeded"
    checkpoints = env.checkpoints(job_id)
    assert [c.step_number for c in checkpoints] == [2, 4]
    job = env.job(job_id)
    base = env.settings.data_dir / "models" / TINY
    tokenizer = Tokenizer.from_dir(base)
    with env.ctx.sessions() as session:
        validation = session.get(File, job.validation_file)
        assert validation is not None
        validation_path = env.settings.data_dir / validation.path
    for c in checkpoints:
        metrics = c.metrics
        assert metrics["eval_step"] == c.step_number and metrics["valid_loss"] == metrics["full_valid_loss"]
        assert 0 <= metrics["full_valid_mean_token_accuracy"] <= 1
        shown = jobs.checkpoint_object(c)  # the probe prompts' answers, beside the metrics
        assert "samples" not in shown.metrics and shown.samples is not None and len(shown.samples) == 3
        assert shown.samples[0]["prompt"] == fact_rows(4, seed=3)[0]["messages"][:-1]
        model = load_adapter(load_model(base), env.settings.data_dir / c.path)
        for p in adapter_state_dict(model).values():
            p.requires_grad_(True)  # a Trainer wants something to train; evaluate() trains nothing
        from app.services.hyperparameters import train_config

        args, _ = train_config(job.method, seed=job.seed, output_dir=env.settings.data_dir / "scratch",
                               total_steps=4, metrics_every=1)
        data = prepare_datasets(tokenizer, args, validation_path, validation_path)
        recomputed = Trainer(model, args, data.train, data.eval).evaluate()
        assert abs(recomputed["eval_loss"] - metrics["full_valid_loss"]) < 1e-5


def test_eval_graders_score_each_checkpoint_of_a_supervised_job(env: WorkerEnv) -> None:
    always = {"type": "string_check", "name": "tagged", "input": "{{item.tag}}", "reference": "x", "operation": "eq"}
    never = {"type": "string_check", "name": "said", "input": "{{sample.output_text}}",
             "reference": "no tiny model says this", "operation": "like"}
    hp = {"n_epochs": 1, "batch_size": 2, "learning_rate": 5e-3, "lora_r": 4, "n_checkpoints": 2,
          "max_seq_length": 128, "eval_graders": [always, never], "eval_samples": 2}
    validation = env.upload([{**r, "tag": "x"} for r in fact_rows(3, seed=3)])
    payload = JobCreate.model_validate({
        "model": TINY, "training_file": env.upload(fact_rows(8)), "validation_file": validation, "seed": 7,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}})
    with env.ctx.sessions() as session:
        job_id = jobs.create_job(session=session, settings=env.settings, broker=env.broker,  # type: ignore[arg-type]
                                 key=env.key, payload=payload, idempotency_key=secrets.token_hex(8),
                                 retry_count=0).id
    assert run(env, job_id) == "succeeded", env.job(job_id).error
    for c in env.checkpoints(job_id):
        m = c.metrics
        assert (m["eval_rewards/tagged/mean"], m["eval_rewards/said/mean"], m["valid_reward_mean"]) == (1.0, 0.0, 0.5)


def test_eval_graders_are_checked_when_the_job_is_made(env: WorkerEnv) -> None:
    from app.core.errors import APIError

    reads_answer = {"type": "string_check", "name": "a", "input": "{{sample.output_text}}",
                    "reference": "{{item.answer}}", "operation": "eq"}
    training = env.upload(fact_rows(4))
    cases = [({"eval_graders": [reads_answer]}, None, "method.supervised.hyperparameters.eval_graders"),
             ({"eval_graders": [{**reads_answer, "operation": "x"}]}, training,
              "method.supervised.hyperparameters.eval_graders[0].operation"),
             ({"eval_graders": [reads_answer]}, training, "validation_file")]  # no `answer` on its lines
    for extra, validation, param in cases:
        payload = JobCreate.model_validate({
            "model": TINY, "training_file": training, "validation_file": validation,
            "method": {"type": "supervised", "supervised": {"hyperparameters": extra}}})
        with env.ctx.sessions() as session, pytest.raises(APIError) as e:
            jobs.create_job(session=session, settings=env.settings, broker=env.broker,  # type: ignore[arg-type]
                            key=env.key, payload=payload, idempotency_key=secrets.token_hex(8), retry_count=0)
        assert e.value.param == param, e.value.message
