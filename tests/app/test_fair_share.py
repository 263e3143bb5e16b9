"""Each key's fair share of the API's turns (issue 15): past `max_requests_in_flight_per_key` a key's requests wait
their turn in order, past `max_queued_requests_per_key` they get 429 with Retry-After, and another key never waits
for them. A request gives its turn back when its answer starts, or when its generation starts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from app.core.fair_share import FairShare, ShareFull, turn_held, yield_turn
from tests.app.conftest import TINY, Backend, served_app

BOUNDARY = "fairshareboundary"


def test_a_keys_requests_past_its_share_wait_in_order_and_past_the_queue_are_refused() -> None:
    async def scenario() -> None:
        share = FairShare(per_key=2, queue_per_key=2)
        await share.acquire("a")
        await share.acquire("a")
        order: list[int] = []

        async def waiter(i: int) -> None:
            await share.acquire("a")
            order.append(i)

        waiters = [asyncio.create_task(waiter(i)) for i in range(2)]
        await asyncio.sleep(0)
        assert order == [] and share.running("a") == 2
        with pytest.raises(ShareFull):
            await share.acquire("a")
        await share.acquire("b")  # another key is not held up by a's queue
        assert share.running("b") == 1
        share.release("a")
        share.release("a")
        await asyncio.gather(*waiters)
        assert order == [0, 1] and share.running("a") == 2
        for key in ("a", "a", "b"):
            share.release(key)
        assert share.running("a") == share.running("b") == 0

    asyncio.run(scenario())


def test_a_waiter_that_leaves_gives_up_its_place_or_passes_on_its_slot() -> None:
    async def scenario() -> None:
        share = FairShare(per_key=1, queue_per_key=4)
        await share.acquire("a")
        left = asyncio.create_task(share.acquire("a"))
        stays = asyncio.create_task(share.acquire("a"))
        await asyncio.sleep(0)
        left.cancel()  # cancelled while waiting: out of the queue
        await asyncio.sleep(0)
        share.release("a")
        await stays
        assert share.running("a") == 1
        granted_then_cancelled = asyncio.create_task(share.acquire("a"))
        last = asyncio.create_task(share.acquire("a"))
        await asyncio.sleep(0)
        share.release("a")  # granted to the first waiter ...
        granted_then_cancelled.cancel()  # ... which leaves before it runs: the slot goes to the next
        await last
        assert share.running("a") == 1
        share.release("a")
        assert share.running("a") == 0

    asyncio.run(scenario())


def test_yield_turn_gives_back_once_and_only_inside_a_request() -> None:
    given: list[int] = []
    yield_turn()  # outside a request: nothing to give
    with turn_held(lambda: given.append(1)):
        yield_turn()
    yield_turn()
    assert given == [1]


def _slow_upload(url: str, key: str, sent_half: threading.Event, go_on: threading.Event) -> httpx.Response:
    """An upload whose body stops halfway until `go_on`: it holds its key's turn for as long as that."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"t.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    row = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head + row
        sent_half.set()
        go_on.wait(30)
        yield row + tail

    return httpx.post(f"{url}/v1/files", content=body(), timeout=60,
                      headers={"Authorization": f"Bearer {key}",
                               "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def _get(url: str, key: str, path: str) -> httpx.Response:
    return httpx.get(url + path, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_a_key_past_its_share_waits_and_the_other_keys_do_not(tmp_path_factory: pytest.TempPathFactory) -> None:
    overrides = {"data_dir": tmp_path_factory.mktemp("fair"), "max_requests_in_flight_per_key": 1,
                 "max_queued_requests_per_key": 1}
    with served_app("sqlite", "fair", overrides) as (_, ctx, url, key, other), ThreadPoolExecutor(4) as pool:
        sent_half, go_on = threading.Event(), threading.Event()
        upload = pool.submit(_slow_upload, url, key, sent_half, go_on)
        try:
            assert sent_half.wait(30)
            time.sleep(0.2)  # the first half reached the server: the upload holds the key's one turn
            assert _get(url, other, "/v1/files").status_code == 200  # another key does not wait
            queued: Future[httpx.Response] = pool.submit(_get, url, key, "/v1/files")
            deadline = time.monotonic() + 30
            while ctx.fair_share.waiting() == 0 and time.monotonic() < deadline:  # until `queued` is in the queue
                time.sleep(0.01)
            refused = _get(url, key, "/v1/models")
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "too_many_requests_in_flight"
            assert int(refused.headers["retry-after"]) >= 1
            assert not queued.done()  # its turn comes after the upload's
        finally:
            go_on.set()
        assert upload.result(30).status_code == 200, upload.result().text
        assert queued.result(30).status_code == 200
        assert _get(url, key, "/v1/models").status_code == 200  # the turns all came back


def test_a_completion_gives_its_turn_back_once_it_generates(backend: Backend) -> None:
    """With one turn per key, a key's long completion does not make its job polls and model reads wait."""
    share = backend.ctx.fair_share
    per_key, share.per_key = share.per_key, 1
    try:
        with ThreadPoolExecutor(1) as pool:
            client = backend.client()
            long = pool.submit(client.completions.create, model=TINY, prompt="hi", max_tokens=500, n=4,
                               extra_body={"ignore_eos": True})
            deadline = time.monotonic() + 30
            while backend.ctx.inference.in_flight == 0 and not long.done() and time.monotonic() < deadline:
                time.sleep(0.01)
            answered = [_get(backend.base_url, backend.user_key, "/v1/models").status_code for _ in range(3)]
            assert not long.done(), "the completion ended before the reads: make it longer"
            assert answered == [200] * 3
            assert long.result(60).usage.completion_tokens == 2000
    finally:
        share.per_key = per_key
