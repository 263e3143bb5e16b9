"""`/health`, `/ready` (database and broker) and `/metrics` (Prometheus)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from pydantic import SecretStr

from app.core.broker import Broker
from app.core.config import load_settings
from app.core.probes import CachedProbe
from tests.app.conftest import TINY, Backend
from tests.helpers import wait_until


def test_health_and_ready(backend: Backend) -> None:
    assert httpx.get(backend.base_url + "/health").json() == {"status": "ok"}
    assert httpx.get(backend.base_url + "/ready").json() == {"status": "ready", "database": "ok", "broker": "ok"}


def test_not_ready_without_the_broker(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable = load_settings(data_dir=backend.settings.data_dir, broker_url="redis://127.0.0.1:1/0")
    monkeypatch.setattr(backend.ctx, "broker", Broker(unreachable))
    answers: list[httpx.Response] = []

    def unready() -> bool:  # an answer may be up to UNSLOTH_PROBE_CACHE_S old
        answers.append(httpx.get(backend.base_url + "/ready", timeout=30))
        return answers[-1].status_code == 503

    wait_until(unready, timeout=backend.settings.probe_cache_s + 20, poll=0.2)
    assert answers[-1].json()["error"]["code"] == "not_ready" and "broker" in answers[-1].json()["error"]["message"]


def test_many_ready_calls_share_one_probe(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: each /ready opened a broker connection on the request thread pool; while Redis was slow every call
    held a thread ~3 s. Sixteen calls at once now cost one probe."""
    pings: list[float] = []

    def slow_ping(timeout: float = 3.0) -> None:
        pings.append(timeout)
        time.sleep(0.5)

    monkeypatch.setattr(backend.ctx.broker, "ping", slow_ping)
    monkeypatch.setattr(backend.ctx, "readiness", CachedProbe(backend.ctx.unready, ttl_s=60))
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: httpx.get(backend.base_url + "/ready", timeout=30).status_code, range(16)))
    assert statuses == [200] * 16 and len(pings) == 1


def test_a_probe_answers_from_its_last_result_while_one_runs() -> None:
    release, calls = threading.Event(), []

    def probe() -> int:
        calls.append(1)
        if len(calls) > 1:
            release.wait(10)
        return len(calls)

    cached = CachedProbe(probe, ttl_s=0)  # every call finds the answer stale
    assert cached() == 1
    slow = threading.Thread(target=cached)
    slow.start()
    wait_until(lambda: len(calls) == 2)
    assert cached() == 1  # at once, from the last answer: the running probe is not waited for
    release.set()
    slow.join(10)
    assert cached._answer is not None and cached._answer.value == 2


def test_metrics_token(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    with_token = backend.settings.model_copy(update={"metrics_token": SecretStr("m-1")})
    monkeypatch.setattr(backend.ctx, "settings", with_token)
    assert httpx.get(backend.base_url + "/metrics").status_code == 401
    assert httpx.get(backend.base_url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.get(backend.base_url + "/metrics", headers={"Authorization": "Bearer m-1"})
    assert r.status_code == 200 and "unsloth_http_requests_total" in r.text


def test_metrics(backend: Backend, training_file: str) -> None:
    client = backend.client()
    client.fine_tuning.jobs.create(model=TINY, training_file=training_file)
    client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    scrapes: list[httpx.Response] = []

    def counted() -> bool:  # the job and queue counts may be up to UNSLOTH_PROBE_CACHE_S old
        scrapes.append(httpx.get(backend.base_url + "/metrics"))
        return 'unsloth_jobs{status="queued"}' in scrapes[-1].text

    wait_until(counted, timeout=backend.settings.probe_cache_s + 20, poll=0.2)
    r = scrapes[-1]
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'unsloth_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert 'unsloth_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/files/{file_id}"' in text \
        or 'route="/v1/fine_tuning/jobs"' in text
    assert 'unsloth_jobs{status="queued"}' in text
    assert 'unsloth_queue_depth{queue="gpu"}' in text
    assert 'unsloth_generated_tokens_total{kind="base"}' in text
    assert "unsloth_generations_in_flight 0.0" in text


def test_the_embedded_broker_forgets_delivered_messages(backend: Backend) -> None:
    """Issue 15: kombu's SQLAlchemy transport (the embedded broker) keeps each delivered message, marked invisible,
    for ever. `Broker.prune` (the housekeeping worker runs it hourly) deletes the old ones, never an undelivered one."""
    from datetime import timedelta

    from sqlalchemy import create_engine, text

    settings, broker = backend.settings, backend.ctx.broker
    if not settings.broker_url.startswith("sqla+"):
        assert broker.prune(timedelta(0)) == 0  # Redis deletes a message when it is delivered
        return
    engine = create_engine(settings.broker_url.removeprefix("sqla+"))

    def rows(visible: bool) -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM kombu_message WHERE visible = :v"),
                                    {"v": visible}).scalar_one())

    try:
        backend.queued_messages()  # what earlier tests left waiting: delivered now
        waiting = rows(visible=True)  # in other queues, if any
        broker.send_train("ftjob-prune-delivered", 0)
        assert ("worker.tasks.train", ["ftjob-prune-delivered", 0]) in backend.queued_messages()  # delivered
        broker.send_train("ftjob-prune-waiting", 0)  # not delivered yet
        assert rows(visible=False) >= 1 and rows(visible=True) == waiting + 1
        assert broker.prune(timedelta(0)) >= 1
        assert rows(visible=False) == 0 and rows(visible=True) == waiting + 1  # the waiting one stays
        assert ("worker.tasks.train", ["ftjob-prune-waiting", 0]) in backend.queued_messages()
    finally:
        engine.dispose()
