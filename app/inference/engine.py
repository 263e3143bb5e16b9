"""Generation off the event loop.

Each request's prompts go to their model's `BatchEngine`, which decodes them in one batch with every other request
for that model, in its own thread. The engine pushes each step's deltas straight onto the event loop
(`call_soon_threadsafe`): no thread per request waits on them, so 32 streams cost the event loop and the engine's
thread, not 32 more threads contending for the GIL. Past `max_concurrent_generations` requests in flight, new ones
are refused at once (429 + Retry-After) rather than queued without bound. `stop()` (a disconnected client) ends the
generation at the engine's next step."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.errors import APIError
from app.core.fair_share import yield_turn
from app.core.metrics import Metrics
from app.inference.cache import ModelCache, Served
from app.services.models import Servable

if TYPE_CHECKING:
    from unsloth_core.generate import Delta
    from unsloth_core.sampling import SamplingParams
    from unsloth_core.serving import Stream

log = logging.getLogger("app.inference")

_DONE = object()
T = TypeVar("T")


class GenerationRun:
    """One running generation: iterate it (async) for lists of deltas; `stop()` ends it early. Created on the event
    loop; its slot (see `InferenceEngine.acquire`) is freed once every one of its requests has ended in the engine,
    whether or not anyone still reads the deltas."""

    def __init__(self, served: Served, prompts: list[list[int]], params: list[SamplingParams], metrics: Metrics,
                 on_done: Callable[[], None]) -> None:
        self.served, self.metrics, self.on_done = served, metrics, on_done
        self.cancelled = False
        self.finished = False
        self._stopped = False
        self._open = len(prompts)  # requests still running in the engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stream: Stream | None = None
        try:
            self._stream = served.engine.submit_all(prompts, params, self._from_engine, adapter=served.adapter,
                                                    tokenizer=served.tokenizer)
        except BaseException as e:  # refused before anything ran
            self._stream = None
            self._deliver(e)

    @property
    def stopped(self) -> bool:
        return self._stopped or self.finished

    def _from_engine(self, item: Delta | BaseException | None) -> None:
        """Called on the engine's thread."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, item)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            self.stop()

    def _deliver(self, item: Delta | BaseException | None) -> None:
        """On the event loop: an item from the engine. The run ends when its last request ends, or at an error."""
        if self.finished:
            return
        if item is None:
            self._open -= 1
            if self._open > 0:
                return
        elif not isinstance(item, BaseException):
            self.metrics.generated_tokens.labels(self.served.kind).inc(len(item.token_ids))
            self._queue.put_nowait(item)
            return
        else:
            self._queue.put_nowait(item)
            if self._stream is not None:
                self._stream.cancel()  # an engine failure: the other requests are told the same
        self.finished = True
        self._queue.put_nowait(_DONE)
        self.on_done()

    def stop(self) -> None:
        """Cancel what is still running (the engine drops it at its next step)."""
        if self.stopped:
            return
        self._stopped = True
        self.cancelled = True
        self.metrics.generations_cancelled.inc()
        if self._stream is not None:
            self._stream.cancel()

    async def __aiter__(self) -> AsyncIterator[list[Delta]]:
        """Lists of deltas: whatever has arrived since the last one (one step's, or several when the reader is
        behind), so a busy server writes fewer, larger chunks instead of falling further behind."""
        try:
            while True:
                items = [await self._queue.get()]
                while not self._queue.empty():
                    items.append(self._queue.get_nowait())
                deltas: list[Delta] = []
                for item in items:
                    if item is _DONE:
                        if deltas:
                            yield deltas
                        return
                    if isinstance(item, BaseException):
                        raise _api_error(item)
                    deltas.append(item)
                yield deltas
        finally:
            self.stop()


def _api_error(e: BaseException) -> BaseException:
    """A request the engine could not fit now is the server's capacity, not a bug: 503, and the client may retry."""
    from unsloth_core.errors import CapacityError, EngineClosedError

    if isinstance(e, CapacityError):
        return APIError(503, f"The server is out of memory for this request: {e}.", type="server_error",
                        code="insufficient_capacity", headers={"Retry-After": "5"})
    if isinstance(e, EngineClosedError):
        return APIError(503, f"The generation was stopped: {e}.", type="server_error", code="engine_closed",
                        headers={"Retry-After": "5"})
    return e


def per_key_share(total: int, configured: int | None) -> int:
    """Generation slots one API key may hold: `configured`, else all but a quarter of the `total` (rounded down: a
    server of fewer than 4 slots reserves none), so one busy key never takes the slots other keys need."""
    return configured or max(1, total - total // 4)


class InferenceEngine:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.cache = ModelCache(settings)
        # Tokenizing and chat templating are CPU work on the caller's text: a few threads of their own, so a huge
        # prompt never holds the event loop (or the thread pool that loads models and serves files).
        self.tokenize_pool = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
        self.runs: weakref.WeakSet[GenerationRun] = weakref.WeakSet()  # running ones, for shutdown
        self.in_flight = 0  # only touched on the event loop
        self.in_flight_by_key: collections.Counter[str] = collections.Counter()

    @staticmethod
    def warm_up() -> None:
        """Import the generation stack (torch among it) now, at startup. Imported at the first completion instead,
        on a loader thread, torch's extension modules initialise holding the GIL: the event loop then stood still
        for about 1.5 s, every other request and stream with it."""
        import unsloth_core.adapters
        import unsloth_core.serving  # noqa: F401

    @property
    def per_key_limit(self) -> int:
        return per_key_share(self.settings.max_concurrent_generations, self.settings.max_generations_per_key)

    def acquire(self, key_id: str = "") -> None:
        """Take a generation slot for `key_id` or refuse with 429 (the caller must `release(key_id)` once done)."""
        total, mine = self.settings.max_concurrent_generations, self.in_flight_by_key[key_id]
        if self.in_flight >= total:
            self._refuse(f"The server is busy: {self.in_flight} generations are running (the limit is {total}).")
        if mine >= self.per_key_limit:
            self._refuse(f"This API key has {mine} generations running, its share of the server's {total} (the "
                         f"others are kept for other keys).")
        self.in_flight += 1
        self.in_flight_by_key[key_id] += 1
        self.metrics.generations_in_flight.inc()

    def _refuse(self, why: str) -> NoReturn:
        self.metrics.generations_rejected.inc()
        retry = str(self.settings.retry_after_s)
        raise APIError(429, f"{why} Retry after {retry} s.", type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": retry, "retry-after-ms": str(1000 * int(retry))})

    def release(self, key_id: str = "") -> None:
        self.in_flight -= 1
        self.in_flight_by_key[key_id] -= 1
        if self.in_flight_by_key[key_id] <= 0:
            del self.in_flight_by_key[key_id]
        self.metrics.generations_in_flight.dec()

    async def load(self, servable: Servable) -> Served:
        import torch

        from unsloth_core.errors import UnslothError

        try:
            return await run_in_threadpool(self.cache.get, servable)
        except (UnslothError, OSError) as e:
            log.error("cannot load model %s: %s", servable.id, e)
            raise APIError(500, f"The model '{servable.id}' could not be loaded; its files are unreadable or "
                                "incomplete.", type="server_error", code="model_load_failed") from None
        except (torch.OutOfMemoryError, MemoryError):
            log.warning("not enough memory to load model %s now", servable.id)
            from unsloth_core.memory import release_memory

            await run_in_threadpool(release_memory)  # what the failed load allocated, garbage by now
            raise APIError(503, f"The server has not enough memory to load the model '{servable.id}' now (models "
                                "it unloaded may still be finishing their requests); retry later.",
                           type="server_error", code="insufficient_capacity", headers={"Retry-After": "5"}) from None

    async def tokenize(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the tokenizer threads."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, functools.partial(fn, *args))

    def start(self, served: Served, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
              key_id: str = "") -> GenerationRun:
        """Start generating (on the event loop); the slot taken by `acquire(key_id)` passes to the run, which frees
        it."""
        self.metrics.prompt_tokens.labels(served.kind).inc(sum(len(p) for p in prompts))
        run = GenerationRun(served, list(prompts), list(params), self.metrics, functools.partial(self.release, key_id))
        yield_turn()  # from here the request waits on the engine, whose per-key share governs it, not on the API
        if not run.finished:
            self.runs.add(run)
        return run

    def shutdown(self) -> None:
        """Stop every generation still running (the server is going away)."""
        for run in list(self.runs):
            run.stop()
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)
