"""Generation off the event loop.

Each request reads its model's `BatchEngine.stream` (which batches it with every other request for that model) in a
thread of a bounded pool; deltas come back to the loop through a queue. Past `max_concurrent_generations` requests
in flight, new ones are refused at once (429 + Retry-After) rather than queued without bound. `stop()` (a
disconnected client) ends the generation at its next step: the engine's stream is closed, which cancels it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import APIError
from app.core.metrics import Metrics
from app.inference.cache import ModelCache, Served
from app.services.models import Servable

if TYPE_CHECKING:
    from unsloth_core.generate import Delta
    from unsloth_core.sampling import SamplingParams

log = logging.getLogger("app.inference")

_DONE = object()


class GenerationRun:
    """One running generation: iterate it (async) for lists of deltas; `stop()` ends it early."""

    def __init__(self, served: Served, prompts: list[list[int]], params: list[SamplingParams],
                 executor: ThreadPoolExecutor, metrics: Metrics, on_done: Callable[[], None]) -> None:
        self.served, self.prompts, self.params = served, prompts, params
        self.metrics, self.on_done = metrics, on_done
        self.stopped = threading.Event()
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._future = executor.submit(self._work)

    def _put(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            self.stopped.set()

    def _work(self) -> None:
        try:
            if self.stopped.is_set():  # the client left while this request waited for a thread
                self.cancelled = True
                self.metrics.generations_cancelled.inc()
                return
            stream = self.served.engine.stream(self.prompts, self.params)  # a generator: closing it cancels
            try:
                for deltas in stream:
                    if self.stopped.is_set():
                        self.cancelled = True
                        self.metrics.generations_cancelled.inc()
                        break
                    self.metrics.generated_tokens.labels(self.served.kind).inc(sum(len(d.token_ids) for d in deltas))
                    self._put(deltas)
            finally:
                stream.close()  # cancels this call's requests in the shared batch
        except BaseException as e:
            self._put(e)
        finally:
            self._put(_DONE)
            # The slot is freed when the thread is done, whether or not anyone still reads the deltas.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self.on_done)

    def stop(self) -> None:
        self.stopped.set()

    async def __aiter__(self) -> AsyncIterator[list[Delta]]:
        try:
            while True:
                item = await self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop()


class InferenceEngine:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.cache = ModelCache(settings)
        self.executor = ThreadPoolExecutor(max_workers=settings.max_concurrent_generations,
                                           thread_name_prefix="generate")
        self.in_flight = 0  # only touched on the event loop

    def acquire(self) -> None:
        """Take a generation slot or refuse with 429 (the caller must `release()` once done)."""
        if self.in_flight >= self.settings.max_concurrent_generations:
            self.metrics.generations_rejected.inc()
            retry = str(self.settings.retry_after_s)
            raise APIError(429, f"The server is busy: {self.in_flight} generations are running (the limit is "
                                f"{self.settings.max_concurrent_generations}). Retry after {retry} s.",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": retry, "retry-after-ms": str(1000 * int(retry))})
        self.in_flight += 1
        self.metrics.generations_in_flight.inc()

    def release(self) -> None:
        self.in_flight -= 1
        self.metrics.generations_in_flight.dec()

    async def load(self, servable: Servable) -> Served:
        from unsloth_core.errors import UnslothError

        try:
            return await run_in_threadpool(self.cache.get, servable)
        except (UnslothError, OSError) as e:
            log.error("cannot load model %s: %s", servable.id, e)
            raise APIError(500, f"The model '{servable.id}' could not be loaded; its files are unreadable or "
                                "incomplete.", type="server_error", code="model_load_failed") from None

    def start(self, served: Served, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> GenerationRun:
        """Start generating in a thread; the slot taken by `acquire()` passes to the run, which frees it."""
        self.metrics.prompt_tokens.labels(served.kind).inc(sum(len(p) for p in prompts))
        return GenerationRun(served, list(prompts), list(params), self.executor, self.metrics, self.release)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
