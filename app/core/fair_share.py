"""Each API key's fair share of the API's request handling (issue 15): while several keys have requests in flight,
one key may run at most `per_key` of its own at once; the rest of its requests wait, first come first served, in a
bounded queue of its own, and past that bound are answered 429 with Retry-After.

Why: on a few cores every request being handled competes for the same CPU and the same GIL with every other one
(and with the generation engine's thread), so a key that keeps eight connections busy with uploads and job
creates got eight of every nine turns, and a neighbour's job poll waited behind them (p99 7x its quiet value, 2
cores, `python -m tests.load --flood`). Rate limits bound a key's requests per minute, not how many it runs at
once. Capping what one key runs at once keeps a turn free for the others; a key alone is capped too (its requests
simply queue), which costs it little: past a few in flight, the CPU, not waiting, is what a request's time goes
to. A slot is held until the answer starts, so a streamed completion holds it only until its first bytes: its
tokens are shared out by the engine's own per-key generation limit. For the same reason a request gives its turn
back as soon as its generation starts (`yield_turn`, called by the inference engine): a non-streamed completion
waits on the engine, not on the API's CPU, and waiting must not cost the key its other requests' turns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

# The running request's way to give its turn back early; set by the middleware for the request's task (and the
# tasks and threads it starts, which copy the context), None outside a request.
_turn: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("fair_share_turn", default=None)


@contextlib.contextmanager
def turn_held(give_back: Callable[[], None]) -> Iterator[None]:
    """Within: `yield_turn` calls `give_back` (which must be idempotent)."""
    token = _turn.set(give_back)
    try:
        yield
    finally:
        _turn.reset(token)


def yield_turn() -> None:
    """The running request waits from now on for something other than the API's CPU (its generation): its key's
    next request may run. Call on the event loop; outside a request (or a second time) it does nothing."""
    give_back = _turn.get()
    if give_back is not None:
        give_back()


class ShareFull(Exception):
    """The key already has as many requests waiting as it may."""


@dataclass
class _Key:
    running: int = 0
    waiting: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class FairShare:
    """Per-key slots, on one event loop (no locks: every call is on the loop's thread)."""

    def __init__(self, per_key: int, queue_per_key: int) -> None:
        self.per_key, self.queue_per_key = per_key, queue_per_key
        self._keys: dict[str, _Key] = {}

    def running(self, key: str) -> int:
        state = self._keys.get(key)
        return state.running if state else 0

    def waiting(self, key: str | None = None) -> int:
        """Requests waiting for their turn: `key`'s, or every key's."""
        states = self._keys.values() if key is None else [self._keys[key]] if key in self._keys else []
        return sum(len(s.waiting) for s in states)

    async def acquire(self, key: str) -> None:
        """Wait for one of `key`'s slots; raises ShareFull when `queue_per_key` requests of the key already wait."""
        state = self._keys.setdefault(key, _Key())
        if state.running < self.per_key and not state.waiting:
            state.running += 1
            return
        if len(state.waiting) >= self.queue_per_key:
            raise ShareFull(key)
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # granted as the client left: pass the slot on
                self.release(key)
            else:
                state.waiting.remove(turn)
            raise

    def release(self, key: str) -> None:
        state = self._keys[key]
        while state.waiting:  # hand the slot straight to the next waiter, so nobody overtakes the queue
            turn = state.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        state.running -= 1
        if state.running == 0:
            del self._keys[key]
