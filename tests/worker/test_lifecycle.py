"""The lifecycle's fenced writes and the reaper, on real databases: one claim per attempt however many deliveries,
no write from a worker that lost its lease, expired leases requeued with attempt + 1 up to the cap, a pending
cancel or pause honoured, concurrent reapers that never requeue a job twice, and the heartbeat."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db.base import utcnow
from app.db.models import Job
from app.services import hyperparameters, lifecycle
from app.services.lifecycle import LeaseLost
from tests.helpers import wait_until
from tests.worker.conftest import WorkerEnv, fact_rows
from worker.lease import Heartbeat, Lease

SOON = timedelta(seconds=1)


def claim(env: WorkerEnv, job_id: str, attempt: int = 0, owner: str = "w/1/1/a",
          lease: timedelta = SOON) -> Job | None:
    with env.ctx.sessions() as session:
        return lifecycle.claim_job(session=session, job_id=job_id, attempt=attempt, owner=owner, lease=lease)


def reap(env: WorkerEnv, after: float = 5.0) -> dict[str, int]:
    """Jobs requeued -> their new attempt (the database is shared by the session's tests: look at yours only)."""
    with env.ctx.sessions() as session:
        return dict(lifecycle.reap_expired(session=session, settings=env.settings,
                                           now=utcnow() + timedelta(seconds=after), limit=1000))


def test_concurrent_deliveries_claim_once(env: WorkerEnv) -> None:
    job_id = env.create_job(env.upload(fact_rows(4)))
    results: list[Job | None] = []
    threads = [threading.Thread(target=lambda i=i: results.append(claim(env, job_id, owner=f"w/1/1/{i}")))
               for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert claim(env, job_id, attempt=1) is None  # an attempt that does not exist yet


def test_a_worker_that_lost_its_lease_writes_nothing(env: WorkerEnv) -> None:
    job_id = env.create_job(env.upload(fact_rows(4)))
    assert claim(env, job_id, owner="old/1/1/a") is not None
    assert reap(env)[job_id] == 1
    assert claim(env, job_id, attempt=1, owner="new/1/1/b", lease=timedelta(seconds=60)) is not None
    before = len(env.events(job_id))
    fence = {"job_id": job_id, "attempt": 0, "owner": "old/1/1/a"}
    adapter = lifecycle.attempt_dir(env.settings, job_id, 0) / "checkpoints" / "step-000001"
    adapter.mkdir(parents=True)
    with env.ctx.sessions() as s:
        with pytest.raises(LeaseLost):
            lifecycle.renew_lease(session=s, **fence)  # type: ignore[arg-type]
        with pytest.raises(LeaseLost):
            lifecycle.read_stop_request(session=s, **fence)  # type: ignore[arg-type]
        with pytest.raises(LeaseLost):
            lifecycle.record_metrics(session=s, message="m", data={}, progress={}, **fence)  # type: ignore[arg-type]
        assert lifecycle.record_checkpoint(session=s, settings=env.settings, step=1, metrics={},
                                           adapter_dir=adapter, **fence) is None  # type: ignore[arg-type]
        assert lifecycle.complete_job(session=s, settings=env.settings, adapter_dir=adapter,
                                      **fence) is None  # type: ignore[arg-type]
        assert not lifecycle.fail_job(session=s, code="x", message="y", **fence)  # type: ignore[arg-type]
        assert lifecycle.stop_job(session=s, status="cancelled", step=1, **fence) is None  # type: ignore[arg-type]
        assert lifecycle.requeue_job(session=s, reason="r", **fence) is None  # type: ignore[arg-type]
    job = env.job(job_id)
    assert (job.status, job.attempt, job.lease_owner) == ("running", 1, "new/1/1/b")
    assert len(env.events(job_id)) == before and env.checkpoints(job_id) == []


def test_a_reap_inside_a_workers_final_write_never_leaves_two_outcomes(env: WorkerEnv,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: on SQLite `SELECT ... FOR UPDATE` is a plain read, so the reaper could requeue a job between a
    worker's read in `complete_job` and its commit, and the commit then marked the requeued job succeeded. Here the
    reaper runs in another connection right inside the worker's transaction: either the worker holds the job and the
    reaper finds nothing to reap, or the reaper wins and the worker writes nothing; never both."""
    job_id = env.create_job(env.upload(fact_rows(4)))
    assert claim(env, job_id, owner="w/1/1/a") is not None  # its lease: 1 s; the reaper looks 5 s ahead
    adapter = lifecycle.attempt_dir(env.settings, job_id, 0) / "adapter"
    adapter.mkdir(parents=True)
    reaped: dict[str, int] = {}
    reaper = threading.Thread(target=lambda: reaped.update(reap(env)))
    real = lifecycle.fine_tuned_model_id

    def racing(*args: str | None) -> str:  # called inside complete_job's transaction, after its read
        reaper.start()
        reaper.join(timeout=2)  # done at once unless the worker's transaction holds the job
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(lifecycle, "fine_tuned_model_id", racing)
    with env.ctx.sessions() as s:
        model = lifecycle.complete_job(session=s, settings=env.settings, job_id=job_id, attempt=0,
                                       owner="w/1/1/a", adapter_dir=adapter)
    reaper.join(timeout=60)
    job = env.job(job_id)
    assert (model is not None) == (job.status == "succeeded") and (job_id in reaped) == (job.status == "queued")
    assert model is not None and job_id not in reaped  # the worker held the job: the reaper waited or skipped it


def test_reaper_requeues_up_to_the_cap_then_fails(env: WorkerEnv) -> None:
    job_id = env.create_job(env.upload(fact_rows(4)))
    live = env.create_job(env.upload(fact_rows(4)))
    assert claim(env, live, lease=timedelta(hours=1)) is not None
    for attempt in range(env.settings.max_job_restarts):
        assert claim(env, job_id, attempt=attempt) is not None
        assert reap(env)[job_id] == attempt + 1
        job = env.job(job_id)
        assert (job.status, job.attempt, job.restarts, job.lease_owner) == ("queued", attempt + 1, attempt + 1, None)
    assert claim(env, job_id, attempt=env.settings.max_job_restarts) is not None
    assert job_id not in reap(env)  # over the cap: failed, not requeued (no requeue storm)
    job = env.job(job_id)
    assert job.status == "failed" and (job.error or {})["code"] == "worker_lost" and job.finished_at is not None
    assert env.job(live).status == "running"  # a live lease is left alone
    assert job_id not in reap(env)


@pytest.mark.parametrize(("request_", "status"), [("cancel", "cancelled"), ("pause", "paused")])
def test_reaper_honours_a_pending_request(env: WorkerEnv, request_: str, status: str) -> None:
    job_id = env.create_job(env.upload(fact_rows(4)))
    assert claim(env, job_id) is not None
    env.update_job(job_id, stop_requested=request_)
    assert job_id not in reap(env)
    job = env.job(job_id)
    assert (job.status, job.stop_requested, job.lease_owner) == (status, None, None)


def test_concurrent_reapers_requeue_once(env: WorkerEnv) -> None:
    job_id = env.create_job(env.upload(fact_rows(4)))
    assert claim(env, job_id) is not None
    results: list[dict[str, int]] = []
    threads = [threading.Thread(target=lambda: results.append(reap(env))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.get(job_id) for r in results].count(1) == 1
    assert env.job(job_id).attempt == 1


def test_preempt_matches_only_this_worker(env: WorkerEnv) -> None:
    mine, other = env.create_job(env.upload(fact_rows(4))), env.create_job(env.upload(fact_rows(4)))
    assert claim(env, mine, owner="gpu_1@h/10/11/a") is not None
    assert claim(env, other, owner="gpuX1@h/10/12/b") is not None  # `_` must not act as a wildcard
    with env.ctx.sessions() as session:
        assert lifecycle.preempt_jobs(session=session, owner_prefix="gpu_1@h/10/") == 1
    assert (env.job(mine).stop_requested, env.job(other).stop_requested) == ("preempt", None)


def test_heartbeat_renews_and_notices_a_lost_lease(env: WorkerEnv) -> None:
    job_id = env.create_job(env.upload(fact_rows(4)))
    assert claim(env, job_id, owner="hb/1/1/a") is not None
    first = env.job(job_id).lease_expires_at
    lease = Lease(env.ctx, job_id, 0, "hb/1/1/a")
    assert first is not None
    with Heartbeat(lease, interval=0.1):
        # Conditions with deadlines, not fixed sleeps: a loaded CI box may take longer than 0.5 s to renew.
        wait_until(lambda: (env.job(job_id).lease_expires_at or first) > first + timedelta(seconds=1), timeout=30)
        env.update_job(job_id, stop_requested="pause")
        wait_until(lambda: lease.stop_requested == "pause", timeout=30)
        assert job_id not in reap(env, after=60)  # paused by the reaper: the lease is gone
        wait_until(lease.lost.is_set, timeout=30)
    assert lease.lost.is_set()
    with pytest.raises(LeaseLost):
        lease.check()


def test_leases_follow_the_database_clock(env: WorkerEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker, or a reaper, whose host clock is an hour off neither keeps a dead lease nor takes a live one
    (PostgreSQL; SQLite lives on one host, where the process clock is the database's)."""
    if env.name != "postgresql":
        pytest.skip("one host, one clock")
    job_id = env.create_job(env.upload(fact_rows(4)))
    monkeypatch.setattr(lifecycle, "utcnow", lambda: utcnow() + timedelta(hours=1))  # this host runs ahead
    assert claim(env, job_id, owner="skew/1/1/a", lease=timedelta(seconds=60)) is not None
    expires = env.job(job_id).lease_expires_at
    assert expires is not None and abs((expires - utcnow()).total_seconds() - 60) < 10
    with env.ctx.sessions() as session:  # a reaper on the fast host: the lease is still live by the database
        assert job_id not in dict(lifecycle.reap_expired(session=session, settings=env.settings, limit=1000))
    monkeypatch.setattr(lifecycle, "utcnow", lambda: utcnow() - timedelta(hours=1))  # ... and one running behind
    env.update_job(job_id, lease_expires_at=utcnow() - timedelta(seconds=1))  # its worker died a moment ago
    with env.ctx.sessions() as session:
        assert job_id in dict(lifecycle.reap_expired(session=session, settings=env.settings, limit=1000))


def test_hyperparameters_become_engine_arguments(env: WorkerEnv, tmp_path: Path) -> None:
    job_id = env.create_job(env.upload(fact_rows(10)), n_epochs=3, batch_size=4, n_checkpoints=3, lora_r=8,
                            lora_alpha=16, lr_scheduler="cosine", warmup_ratio=0.1, packing=True)
    job = env.job(job_id)
    args, lora = hyperparameters.train_config(job.method, seed=job.seed, output_dir=tmp_path, total_steps=9,
                                              metrics_every=5)
    assert (args.method, args.num_epochs, args.micro_batch_size, args.gradient_accumulation_steps) == ("sft", 3, 4, 1)
    assert (args.learning_rate, args.lr_scheduler, args.warmup_ratio, args.max_seq_length) == (5e-3, "cosine", 0.1,
                                                                                               128)
    assert (args.packing, args.seed, args.save_steps, args.logging_steps, args.output_dir) == (True, 7, 3, 5,
                                                                                               str(tmp_path))
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16, 0.0) and len(lora.target_modules) == 7
    with env.ctx.sessions() as session:
        assert session.scalar(select(Job.status).where(Job.id == job_id)) == "queued"
