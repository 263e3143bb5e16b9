"""A small asyncio + httpx load generator for the API, over loopback (reliability.md L1/L2).

Why not locust or wrk for everything: the measure that matters for serving is completion tokens per second across
concurrent *streaming* clients, which needs each SSE stream read to its usage chunk; wrk cannot count streamed
tokens and locust (gevent, monkey-patching) cannot run inside the pytest process that the CI check uses. wrk is
still the better tool for raw request rates and `__main__` uses it for job polling when it is installed.

Each phase runs `clients` concurrent loops for `duration` seconds (requests in flight at the deadline finish and
count), and returns a `PhaseResult`: status counts, latency percentiles, throughput, and for completions the
completion tokens and time to first token. Every 429 is checked for its `Retry-After` header; a 5xx, a transport
error or a broken stream is counted as an error."""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class PhaseResult:
    name: str
    clients: int
    duration_s: float = 0.0  # wall time from the first request to the last answer
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)  # successful requests: whole request (stream read to end)
    ttft_s: list[float] = field(default_factory=list)  # streams: until the first token
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)  # transport errors, broken streams
    missing_retry_after: int = 0  # 429s without Retry-After
    cut_off: int = 0  # requests whose connection the server closed while their body was still being sent
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)  # at the end of the phase

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    def summary(self) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 1)

        wall = self.duration_s or float("nan")
        return {
            "phase": self.name, "clients": self.clients, "duration_s": round(self.duration_s, 2),
            "requests": self.requests, "statuses": dict(sorted(self.statuses.items())),
            "ok_per_s": round(self.ok / wall, 1),
            "p50_ms": ms(percentile(self.latencies_s, 50)), "p99_ms": ms(percentile(self.latencies_s, 99)),
            "ttft_p50_ms": ms(percentile(self.ttft_s, 50)), "ttft_p99_ms": ms(percentile(self.ttft_s, 99)),
            "completion_tokens": self.completion_tokens,
            "tokens_per_s": round(self.completion_tokens / wall, 1) if self.completion_tokens else None,
            "errors": len(self.errors), "missing_retry_after": self.missing_retry_after, "cut_off": self.cut_off,
            "load_average": [round(x, 2) for x in self.load_average],
        }

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["statuses"] = dict(self.statuses)
        return data


def _client(base_url: str, key: str, clients: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                             timeout=httpx.Timeout(timeout, connect=10))


def _record_status(result: PhaseResult, response: httpx.Response) -> None:
    result.statuses[response.status_code] += 1
    if response.status_code == 429 and not response.headers.get("retry-after"):
        result.missing_retry_after += 1


async def _run(result: PhaseResult, clients: int, duration: float, one: Any, interval_s: float = 0.0
               ) -> PhaseResult:
    """Each client calls `one` again as soon as it returns, or (`interval_s`) at most every `interval_s` on a fixed
    schedule, as a client that polls does: then a slow answer is not followed by a pause."""
    deadline = time.monotonic() + duration
    start = time.perf_counter()

    takes_client = "client" in inspect.signature(one).parameters

    async def loop(client: int) -> None:
        due = time.monotonic()
        while time.monotonic() < deadline:
            await (one(client=client) if takes_client else one())
            due += interval_s
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    await asyncio.gather(*(loop(i) for i in range(clients)))
    result.duration_s = time.perf_counter() - start
    result.load_average = os.getloadavg()
    return result


async def poll_job(base_url: str, key: str, job_id: str, *, clients: int, duration: float,
                   timeout: float = 30, name: str | None = None, interval_s: float = 0.0) -> PhaseResult:
    """`GET /v1/fine_tuning/jobs/{id}` in a loop from `clients` concurrent clients (each at most every
    `interval_s`)."""
    result = PhaseResult(name or f"poll job x{clients}", clients)
    async with _client(base_url, key, clients, timeout) as http:
        async def one() -> None:
            began = time.perf_counter()
            try:
                response = await http.get(f"/v1/fine_tuning/jobs/{job_id}")
            except httpx.HTTPError as e:
                result.errors.append(f"{type(e).__name__}: {e}")
                return
            _record_status(result, response)
            if response.status_code == 200:
                result.latencies_s.append(time.perf_counter() - began)

        return await _run(result, clients, duration, one, interval_s)


async def stream_completions(base_url: str, key: str, model: str | list[str], *, clients: int, duration: float,
                             max_tokens: int, prompt: str = "Once upon a time", ignore_eos: bool = True,
                             chat: bool = False, timeout: float = 300, name: str | None = None,
                             backoff_on_429: bool = True) -> PhaseResult:
    """Streaming completions (`stream_options.include_usage`) in a loop from `clients` concurrent clients; tokens
    are counted from each stream's usage chunk. A 429 waits its Retry-After (when `backoff_on_429`). Given a list of
    models, client i asks for model i (mod the list's length): each client on its own fine-tune."""
    models = [model] if isinstance(model, str) else model
    result = PhaseResult(name or f"stream {'chat' if chat else 'completions'} x{clients}", clients)
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"max_tokens": max_tokens, "stream": True, "temperature": 0.8,
                            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt

    async with _client(base_url, key, clients, timeout) as http:
        async def one(client: int) -> None:
            began = time.perf_counter()
            first: float | None = None
            usage: dict[str, Any] | None = None
            done = False
            try:
                async with http.stream("POST", path, json={**body, "model": models[client % len(models)]}
                                       ) as response:
                    _record_status(result, response)
                    if response.status_code != 200:
                        await response.aread()
                        if response.status_code == 429 and backoff_on_429:
                            await asyncio.sleep(float(response.headers.get("retry-after") or 1))
                        return
                    async for line in response.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            result.errors.append(f"stream error: {chunk['error']}")
                            return
                        if first is None and chunk.get("choices"):
                            first = time.perf_counter()
                        if chunk.get("usage"):
                            usage = chunk["usage"]
            except (httpx.HTTPError, json.JSONDecodeError) as e:
                result.errors.append(f"{type(e).__name__}: {e}")
                return
            if not done or usage is None:
                result.errors.append("stream ended without usage and [DONE]")
                return
            result.completion_tokens += int(usage["completion_tokens"])
            result.latencies_s.append(time.perf_counter() - began)
            if first is not None:
                result.ttft_s.append(first - began)

        return await _run(result, clients, duration, one)


FLOOD_KINDS = ("unauthenticated", "upload", "job", "completion")


async def flood(base_url: str, key: str, model: str, *, clients: int, duration: float,
                body_bytes: int = 16 * 2**20, kinds: tuple[str, ...] = FLOOD_KINDS) -> PhaseResult:
    """One tenant misbehaving from `clients` connections at once, client i sending requests of `kinds[i % len]`
    without pause, 429s or not: 16 MiB bodies without a key, cheap uploads, job creates (of the last uploaded file;
    completions until there is one), completions. Its answers are 200s, then 429s past its limits, and 401s; a 5xx
    or a transport error is a finding (but an unauthenticated body may be cut off mid-send: that is the point)."""
    result = PhaseResult(f"flood x{clients}", clients)
    row = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    blob = b"x" * body_bytes
    async with _client(base_url, key, clients, 60) as http:
        file_id: list[str] = []

        async def one(client: int) -> None:
            kind = kinds[client % len(kinds)]
            began = time.perf_counter()
            try:
                if kind == "unauthenticated":  # as large as the body limit allows
                    response = await http.post("/v1/chat/completions", content=blob,
                                               headers={"Authorization": "", "Content-Type": "application/json"})
                elif kind == "upload":
                    response = await http.post("/v1/files", files={"file": ("f.jsonl", row * 4)},
                                               data={"purpose": "fine-tune"})
                    if response.status_code == 200:
                        file_id[:] = [response.json()["id"]]
                elif kind == "job" and file_id:
                    response = await http.post("/v1/fine_tuning/jobs", json={"model": model,
                                                                             "training_file": file_id[0]})
                else:
                    response = await http.post("/v1/completions", json={"model": model, "prompt": "flood",
                                                                        "max_tokens": 16, "ignore_eos": True})
            except httpx.HTTPError as e:
                if kind == "unauthenticated":  # the server answered 401 and closed the connection mid-body
                    result.cut_off += 1
                else:
                    result.errors.append(f"{type(e).__name__}: {e}")
                return
            _record_status(result, response)
            result.latencies_s.append(time.perf_counter() - began)

        return await _run(result, clients, duration, one)


def flood_in_process(base_url: str, key: str, model: str, clients: int, duration: float,
                     kinds: tuple[str, ...] = FLOOD_KINDS) -> PhaseResult:
    """`flood` on an event loop of its own, for a process of its own: on the loop of the clients it is measured
    against, its own work (16 MiB bodies, hundreds of answers a second) would be counted in their latency."""
    return asyncio.run(flood(base_url, key, model, clients=clients, duration=duration, kinds=kinds))


def ready() -> bool:
    """Called once in a new worker process, so that its start-up (imports) is over before the clock starts."""
    return True
