"""Per-key request rate limits per route family (issue 15), over the real app on both backends: SQLite counts in the
process (the embedded mode), PostgreSQL + Redis counts in Redis, shared by API processes. Each test makes its own
keys, so counts start at 0; the limits are small settings here (the defaults are far above any test's rate)."""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from app.core.config import Settings
from app.core.context import AppContext
from app.core.rate_limit import go_duration
from app.main import create_app
from app.services import keys
from tests.app.conftest import ServerThread, served_app

LIMIT = 3
RESET = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")  # Go's durations, as OpenAI writes them
LIMITS = {"rpm_models": LIMIT, "rpm_completions": LIMIT, "rpm_files": LIMIT + 2, "rpm_fine_tuning": LIMIT + 4}


@dataclass
class Limited:
    name: str
    settings: Settings
    ctx: AppContext
    base_url: str

    def new_key(self) -> str:
        with self.ctx.sessions() as session:
            return keys.create_key(session=session, name="limited")[1]

    def get(self, path: str, key: str, base_url: str | None = None) -> httpx.Response:
        return httpx.get((base_url or self.base_url) + path, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _serve(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           window_s: float) -> Iterator[Limited]:
    name = request.param
    overrides: dict[str, Any] = {"data_dir": tmp_path_factory.mktemp(f"limited-{name}"),
                                 "rate_limit_window_s": window_s, **LIMITS}
    with served_app(name, "ratelimit", overrides) as (settings, ctx, url, _, _):
        yield Limited(name, settings, ctx, url)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def limited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    """A minute's window: no test here comes near its end."""
    yield from _serve(request, tmp_path_factory, 60.0)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def short_window(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    yield from _serve(request, tmp_path_factory, 1.0)


def assert_counted(r: httpx.Response, limit: int, remaining: int) -> None:
    assert r.headers["x-ratelimit-limit-requests"] == str(limit), r.headers
    assert r.headers["x-ratelimit-remaining-requests"] == str(remaining), r.headers
    assert RESET.match(r.headers["x-ratelimit-reset-requests"]), r.headers


def assert_rate_limited(r: httpx.Response, limit: int) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and error["param"] is None
    assert f"Limit {limit}" in error["message"] and "Please try again in" in error["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert_counted(r, limit, 0)


def test_past_its_limit_a_key_gets_429_while_another_key_and_family_are_served(limited: Limited) -> None:
    flooder, other = limited.new_key(), limited.new_key()
    for i in range(LIMIT):
        r = limited.get("/v1/models", flooder)
        assert r.status_code == 200
        assert_counted(r, LIMIT, LIMIT - 1 - i)  # the remaining count goes down
    refused = limited.get("/v1/models", flooder)
    assert_rate_limited(refused, LIMIT)
    assert "connection" not in refused.headers  # no body to skip: the connection is kept for the next request
    assert_rate_limited(limited.get("/v1/models/tiny-chat", flooder), LIMIT)  # the whole family
    r = limited.get("/v1/models", other)  # one key's count never touches another's
    assert r.status_code == 200
    assert_counted(r, LIMIT, LIMIT - 1)
    r = limited.get("/v1/files", flooder)  # nor one family's another's
    assert r.status_code == 200
    assert_counted(r, LIMIT + 2, LIMIT + 1)


def test_completions_and_chat_share_a_count_and_the_429_comes_before_the_body(limited: Limited) -> None:
    key = limited.new_key()
    headers = {"Authorization": f"Bearer {key}"}
    for i, path in enumerate(["/v1/completions", "/v1/chat/completions", "/v1/completions"]):
        r = httpx.post(limited.base_url + path, json={"model": "no-such-model"}, headers=headers, timeout=30)
        assert r.status_code == 400  # refused by the route (no prompt): counted all the same
        assert_counted(r, LIMIT, LIMIT - 1 - i)
    # Past the limit the answer comes while the declared 16 MB body is still unsent: it was never waited for.
    host, port = limited.base_url.removeprefix("http://").split(":")
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: 16000000\r\n\r\n{{\"").encode()
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)  # a server waiting for the body times this out: the test fails
            assert chunk, "the server closed the connection without an answer"
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"429"
    assert b"connection: close" in rest.lower() and b"x-ratelimit-remaining-requests: 0" in rest.lower()


def test_the_count_starts_again_when_the_window_ends(short_window: Limited) -> None:
    key = short_window.new_key()
    for _ in range(LIMIT):
        assert short_window.get("/v1/models", key).status_code == 200
    refused = short_window.get("/v1/models", key)
    assert_rate_limited(refused, LIMIT)
    time.sleep(int(refused.headers["retry-after-ms"]) / 1000)  # at least what is left of the 1 s window
    r = short_window.get("/v1/models", key)
    assert r.status_code == 200
    assert_counted(r, LIMIT, LIMIT - 1)


def test_the_openai_client_sees_a_rate_limit_error(limited: Limited) -> None:
    client = openai.OpenAI(base_url=limited.base_url + "/v1", api_key=limited.new_key(), max_retries=0, timeout=30)
    raw = client.models.with_raw_response.list()
    assert raw.headers["x-ratelimit-remaining-requests"] == str(LIMIT - 1)
    for _ in range(LIMIT - 1):
        client.models.list()
    with pytest.raises(openai.RateLimitError) as e:
        client.models.list()
    assert e.value.status_code == 429 and e.value.code == "rate_limit_exceeded" and e.value.type == "requests"
    assert e.value.response.headers["retry-after"].isdigit()


def test_api_processes_on_one_redis_share_a_count(limited: Limited) -> None:
    """Compose runs several API processes behind one address: a key's count is one, whichever serves it."""
    if limited.name != "postgresql":
        pytest.skip("the embedded mode (SQLite) is one process and counts in it")
    second = create_app(limited.settings)  # another API on the same database and Redis
    try:
        with ServerThread(second) as server:
            other_url = f"http://127.0.0.1:{server.port}"
            key = limited.new_key()
            for i in range(LIMIT):
                r = limited.get("/v1/models", key, base_url=(limited.base_url, other_url)[i % 2])
                assert r.status_code == 200
                assert_counted(r, LIMIT, LIMIT - 1 - i)
            assert_rate_limited(limited.get("/v1/models", key, base_url=other_url), LIMIT)
    finally:
        second.state.ctx.close()


def test_with_redis_down_requests_are_served_uncounted_and_it_is_said_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    overrides: dict[str, Any] = {"data_dir": tmp_path, "broker_url": dead, **LIMITS}
    caplog.set_level(logging.WARNING, logger="app.rate_limit")
    with served_app("sqlite", "ratelimit-down", overrides) as (_, _, url, key, _):
        for _ in range(LIMIT + 2):
            r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers
    warnings = [r for r in caplog.records if r.name == "app.rate_limit"]
    assert len(warnings) == 1 and "not enforced" in warnings[0].getMessage()


@pytest.mark.parametrize(("seconds", "text"), [(0.012, "12ms"), (0.9994, "999ms"), (1, "1s"), (59.5, "59.5s"),
                                               (60, "1m0s"), (360, "6m0s"), (90.25, "1m30.25s"), (3600, "1h0m0s")])
def test_reset_times_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text



def test_a_key_found_live_moments_ago_is_let_in_without_the_database(limited: Limited) -> None:
    """A flooding key's requests, refused 429 or not, take no database lookup and no worker thread to be let in:
    the gate answers a key it found live within `ttl_s` from memory, on the event loop."""
    from app.services.key_gate import KeyGate

    gate, lookups = KeyGate(limited.ctx.sessions, ttl_s=3600), []
    real_sessions = gate.sessions
    gate.sessions = lambda: (lookups.append(1), real_sessions())[1]  # type: ignore[assignment,method-assign]
    key = limited.new_key()
    assert gate.remembered(key) is None and lookups == []  # not yet found: the caller asks `identify`
    key_id = gate.identify(key)
    assert key_id is not None and len(lookups) == 1
    assert gate.remembered(key) == key_id and len(lookups) == 1
    assert gate.remembered("sk-unsloth-nope") is None and len(lookups) == 1


def test_every_v1_family_is_counted() -> None:
    from app.core.rate_limit import route_family

    assert [route_family(p) for p in ("/v1/evals/eval_1/runs", "/v1/exports", "/v1/chat/completions",
                                      "/v1/fine_tuning/alpha/graders/run", "/v1/nope")] == [
        "fine_tuning", "fine_tuning", "completions", "fine_tuning", None]
