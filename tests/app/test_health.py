"""`/health`, `/ready` (database and broker) and `/metrics` (Prometheus)."""

from __future__ import annotations

import httpx
import pytest

from app.core.broker import Broker
from app.core.config import load_settings
from tests.app.conftest import TINY, Backend


def test_health_and_ready(backend: Backend) -> None:
    assert httpx.get(backend.base_url + "/health").json() == {"status": "ok"}
    assert httpx.get(backend.base_url + "/ready").json() == {"status": "ready", "database": "ok", "broker": "ok"}


def test_not_ready_without_the_broker(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable = load_settings(data_dir=backend.settings.data_dir, broker_url="redis://127.0.0.1:1/0")
    monkeypatch.setattr(backend.ctx, "broker", Broker(unreachable))
    r = httpx.get(backend.base_url + "/ready", timeout=30)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "not_ready" and "broker" in r.json()["error"]["message"]


def test_metrics(backend: Backend, training_file: str) -> None:
    client = backend.client()
    client.fine_tuning.jobs.create(model=TINY, training_file=training_file)
    client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    r = httpx.get(backend.base_url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'unsloth_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    assert 'unsloth_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/v1/files/{file_id}"' in text \
        or 'route="/v1/fine_tuning/jobs"' in text
    assert 'unsloth_jobs{status="queued"}' in text
    assert 'unsloth_queue_depth{queue="gpu"}' in text
    assert 'unsloth_generated_tokens_total{kind="base"}' in text
    assert "unsloth_generations_in_flight 0.0" in text
