"""A health probe's answer reused for a few seconds, one probe at a time.

`/ready` and `/metrics` each opened a broker connection and ran a query per call, on the request thread pool and
without a key: while Redis was slow every call held a thread ~3 s, so a client polling them could take the pool.
Now a probe runs at most once per `ttl_s`; while one runs, other callers get the previous answer at once (they wait
only when there is none yet). An answer may thus be `ttl_s` old: a dependency that just went down shows within that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Answer(Generic[T]):
    at: float
    value: T | None = None
    error: BaseException | None = None

    def get(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class CachedProbe(Generic[T]):
    def __init__(self, probe: Callable[[], T], ttl_s: float) -> None:
        self.probe, self.ttl_s = probe, ttl_s
        self._answer: _Answer[T] | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T:
        answer = self._answer
        if answer is not None and time.monotonic() - answer.at < self.ttl_s:
            return answer.get()
        if not self._lock.acquire(blocking=answer is None):  # another caller is probing: its last answer will do
            assert answer is not None
            return answer.get()
        try:
            latest = self._answer
            if latest is not None and latest is not answer and time.monotonic() - latest.at < self.ttl_s:
                return latest.get()  # probed by the caller this one waited for
            try:
                self._answer = _Answer(time.monotonic(), value=self.probe())
            except Exception as e:
                self._answer = _Answer(time.monotonic(), error=e)
            return self._answer.get()
        finally:
            self._lock.release()
