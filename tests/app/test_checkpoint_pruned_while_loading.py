"""A checkpoint pruned (issue 15: a job keeps its newest `n_checkpoints`) while a completion for it is loading it: the
request resolved the model's row before the prune and finds its files gone when it loads them. It is answered 404
`model_not_found`, as a request that came a moment later is, never a 500.

Deterministic without sleeps: the test holds the model cache's load lock (loads are one at a time), so the request
resolves its row and then waits to load; the checkpoint is pruned meanwhile, through the worker's own write, and the
lock let go."""

from __future__ import annotations

import secrets
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from app.services import keys, lifecycle
from tests.app.conftest import TINY, Backend, TrainedRun, chat_rows, copy_tree, jsonl, upload
from tests.helpers import wait_until


def test_a_checkpoint_pruned_while_a_completion_loads_it_is_404_model_not_found(backend: Backend,
                                                                                trained_run: TrainedRun) -> None:
    with backend.ctx.sessions() as session:
        key, token = keys.create_key(session=session, name="pruned")
    client = backend.client(token)
    training = upload(client, jsonl(chat_rows(16)))
    job = client.fine_tuning.jobs.create(model=TINY, training_file=training.id, method={
        "type": "supervised", "supervised": {"hyperparameters": {"n_checkpoints": 1}}})
    fence = {"job_id": job.id, "attempt": 0, "owner": "test-worker@" + secrets.token_hex(2)}
    job_dir = lifecycle.job_dir(backend.settings, job.id)

    def record(index: int) -> str:
        step, path, metrics = trained_run.checkpoints[index]
        with backend.ctx.sessions() as session:
            row = lifecycle.record_checkpoint(session=session, settings=backend.settings, step=step, metrics=metrics,
                                              adapter_dir=copy_tree(path, job_dir / "checkpoints" / path.name),
                                              **fence)
        assert row is not None
        return str(row.model_id)

    with backend.ctx.sessions() as session:
        assert lifecycle.claim_job(session=session, **fence) is not None
    oldest = record(0)
    engine = backend.ctx.inference
    with ThreadPoolExecutor(1) as pool:
        with engine.cache._load_lock:
            asked = pool.submit(client.chat.completions.create, model=oldest, max_tokens=2,
                                messages=[{"role": "user", "content": "hi"}])
            wait_until(lambda: engine.in_flight_by_key.get(key.id) == 1)  # its row resolved, its load next
            record(1)  # n_checkpoints 1: the oldest is pruned, its row and then its files
            assert not (job_dir / "checkpoints" / trained_run.checkpoints[0][1].name).exists()
        with pytest.raises(openai.NotFoundError) as e:
            asked.result()
    assert (e.value.code, e.value.param) == ("model_not_found", "model")
    assert oldest in e.value.message
    wait_until(lambda: key.id not in engine.in_flight_by_key)  # its generation slot given back
