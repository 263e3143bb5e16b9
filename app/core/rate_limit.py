"""Per-API-key request rate limits, per route family (issue 15): `/v1/files...` is one family, `/v1/fine_tuning...`
another (with `/v1/exports...` and `/v1/evals...`), `/v1/models...` a third (with `/v1/organization...`, the key
admin API), and `/v1/completions` with `/v1/chat/completions` the fourth; each has its own limit of requests per
window (a minute) and one key's count never touches another's.

A fixed window that starts at a key's first request in a family: its count goes up by one per request (refused
ones included, so a client that ignores Retry-After gains nothing) and starts again at 0 when the window ends.
Counts live in Redis when the broker is Redis, so the API processes behind one address (compose) share them, and
in this process otherwise (the embedded mode is one process). If Redis does not answer, requests are served
uncounted: one warning, not a refusal of everyone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import redis

from app.core.config import Settings
from app.core.errors import APIError

log = logging.getLogger("app.rate_limit")

FAMILIES = ("files", "fine_tuning", "models", "completions")
# /v1/chat/completions counts with /v1/completions; /v1/exports (a fine-tune's artifacts) with /v1/fine_tuning.
# /v1/organization (API keys) with /v1/models: both are cheap reads and writes of small rows, and kept apart from
# fine_tuning's job polling, so a script polling with an admin key cannot use up what revoking a leaked key needs.
_ALIASES = {"chat": "completions", "tool_call_checks": "completions", "exports": "fine_tuning", "evals": "fine_tuning",
            "organization": "models"}


def route_family(path: str, prefix: str = "/v1/") -> str | None:
    """The family a `/v1` path is counted in, or None for a path in none of them (answered 404, uncounted)."""
    if not path.startswith(prefix):
        return None
    segment = path[len(prefix):].split("/", 1)[0]
    family = _ALIASES.get(segment, segment)
    return family if family in FAMILIES else None


def go_duration(seconds: float) -> str:
    """A duration as Go prints one, which is how OpenAI writes `x-ratelimit-reset-*`: `12ms`, `1s`, `59.5s`,
    `6m0s`, `1h0m0s` (to the millisecond)."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class Window:
    """One key's count in one family's current window, this request included."""

    limit: int
    used: int
    reset_s: float  # until the window ends and the count starts again
    per: str  # the window in words, for the error message ("min (RPM)")

    @property
    def allowed(self) -> bool:
        return self.used <= self.limit

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.used)

    def headers(self) -> dict[str, str]:
        """OpenAI's request-limit headers, sent with every answer to a counted request."""
        return {"x-ratelimit-limit-requests": str(self.limit),
                "x-ratelimit-remaining-requests": str(self.remaining),
                "x-ratelimit-reset-requests": go_duration(self.reset_s)}

    def error(self, family: str) -> APIError:
        """OpenAI's answer past a requests-per-minute limit: 429, type `requests`, code `rate_limit_exceeded`."""
        retry_s = max(1, math.ceil(self.reset_s))
        message = (f"Rate limit reached for {family} requests on this API key on requests per {self.per}: "
                   f"Limit {self.limit}, Used {self.limit}, Requested 1. Please try again in "
                   f"{go_duration(self.reset_s)}.")
        return APIError(429, message, type="requests", code="rate_limit_exceeded",
                        headers={**self.headers(), "Retry-After": str(retry_s), "retry-after-ms": str(retry_s * 1000)})


class Counter(Protocol):
    blocking: bool  # whether `hit` waits on the network (then it is called on a worker thread)

    def hit(self, name: str, window_s: float) -> tuple[int, float] | None:
        """Count one request under `name`: (requests in its window so far, seconds until the window ends), or
        None when the count cannot be had (the request is then served uncounted)."""
        ...


class MemoryCounter:
    """Counts in this process (the embedded mode, or a broker that is not Redis)."""

    blocking = False

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, float]] = {}  # name -> (count, when its window ends)
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def hit(self, name: str, window_s: float) -> tuple[int, float]:
        now = time.monotonic()
        with self._lock:
            if now >= self._next_sweep:  # ended windows go, so the dict holds only keys seen lately
                self._windows = {k: v for k, v in self._windows.items() if v[1] > now}
                self._next_sweep = now + window_s
            count, ends = self._windows.get(name, (0, 0.0))
            if ends <= now:
                count, ends = 0, now + window_s
            self._windows[name] = (count + 1, ends)
        return count + 1, ends - now


# INCR and the window's expiry in one step: two processes cannot both see a new key and both set its window, and
# a key is never left without an expiry (which would count it for ever).
_HIT_SCRIPT = """
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
"""


class RedisCounter:
    """Counts in Redis, shared by every API process on the same Redis. Fails open: while Redis does not answer,
    `hit` returns None (one warning per outage), and after a failure it is not asked again for `retry_s`, so an
    outage does not add a connection timeout to every request."""

    blocking = True

    def __init__(self, url: str, prefix: str = "", timeout_s: float = 0.5, retry_s: float = 5.0) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.prefix, self.retry_s = prefix + "unsloth:ratelimit:", retry_s
        self._script = self.client.register_script(_HIT_SCRIPT)
        self._down_until: float | None = None  # set while Redis is failing

    def hit(self, name: str, window_s: float) -> tuple[int, float] | None:
        if self._down_until is not None and time.monotonic() < self._down_until:
            return None
        try:
            count, ttl_ms = self._script(keys=[self.prefix + name], args=[max(1, round(window_s * 1000))])
        except redis.RedisError as e:
            if self._down_until is None:
                log.warning("rate limits are not enforced while Redis does not answer (%s: %s)",
                            type(e).__name__, e)
            self._down_until = time.monotonic() + self.retry_s
            return None
        if self._down_until is not None:
            log.warning("Redis answers again: rate limits are enforced")
            self._down_until = None
        return int(count), int(ttl_ms) / 1000

    def close(self) -> None:
        self.client.close()


def _window_words(window_s: float) -> str:
    return "min (RPM)" if window_s == 60 else f"{window_s:g} s"


class RateLimiter:
    def __init__(self, limits: dict[str, int], window_s: float, counter: Counter) -> None:
        self.limits, self.window_s, self.counter = limits, window_s, counter

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        limits = {"files": settings.rpm_files, "fine_tuning": settings.rpm_fine_tuning,
                  "models": settings.rpm_models, "completions": settings.rpm_completions}
        counter: Counter = MemoryCounter()
        if settings.broker_url.startswith(("redis://", "rediss://")):
            prefix = str(settings.broker_transport_options.get("global_keyprefix", ""))
            counter = RedisCounter(settings.broker_url, prefix)
        return cls(limits, settings.rate_limit_window_s, counter)

    @property
    def blocking(self) -> bool:
        return self.counter.blocking

    def check(self, key_id: str, family: str) -> Window | None:
        """Count a request of `key_id` in `family`: its window, or None when uncounted (no limit set for the
        family, or the shared count unavailable)."""
        limit = self.limits.get(family, 0)
        if limit <= 0:
            return None
        counted = self.counter.hit(f"{family}:{key_id}", self.window_s)
        if counted is None:
            return None
        used, reset_s = counted
        return Window(limit, used, reset_s, _window_words(self.window_s))

    def close(self) -> None:
        if isinstance(self.counter, RedisCounter):
            self.counter.close()
