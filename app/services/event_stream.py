"""`GET /v1/fine_tuning/jobs/{id}/events?stream=true`: the job's events as SSE, oldest first, then new ones as they
are written, until the job ends (`data: [DONE]`) or the client goes away.

Polls the database (the only place every process writes to). Ids carry their creation millisecond; each poll re-reads
a short window behind the newest event seen, so an event committed late by another process is not skipped, and ids
already sent are not sent twice. A database outage does not end the stream: it keeps polling (and sending
keep-alives) until the database answers again."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from app.db.models import TERMINAL_STATUSES, Job, JobEvent
from app.services.jobs import event_object, events_since

LATE_WINDOW_MS = 5_000
KEEPALIVE_S = 15.0
OUTAGE_POLL_S = 1.0  # how often a stream asks again while the database is unavailable

log = logging.getLogger("app.events")


def _id_ms(event_id: str, prefix_len: int) -> int:
    """The creation millisecond an event id carries; 0 for a cursor that is not one of our ids (any string may come
    in as `after`: it then only filters by comparison)."""
    try:
        return int(event_id[prefix_len:prefix_len + 12], 16)
    except ValueError:
        return 0


async def stream_events(*, sessions: Callable[[], Session], job_id: str, request: Request, poll_s: float,
                        after: str | None = None) -> AsyncIterator[str]:
    from app.core import ids

    prefix = len(ids.EVENT)
    sent: dict[str, int] = {}
    since_ms = _id_ms(after, prefix) if after and after.startswith(ids.EVENT) else 0
    last_beat = time.monotonic()

    def poll() -> tuple[list[JobEvent], str | None]:
        with sessions() as session:
            job = session.get(Job, job_id)
            return events_since(session=session, job_id=job_id, since_ms=since_ms), job.status if job else None

    outage = False
    while True:
        try:
            events, status = await run_in_threadpool(poll)
        except OperationalError as e:  # the database is away (restarting): keep the stream open and ask again
            if not outage:
                log.warning("events of job %s: the database is unavailable (%s); the stream waits", job_id,
                            type(e).__name__)
            outage = True
            if await request.is_disconnected():
                return
            if time.monotonic() - last_beat > KEEPALIVE_S:
                yield ": keep-alive\n\n"
                last_beat = time.monotonic()
            await asyncio.sleep(max(poll_s, OUTAGE_POLL_S))
            continue
        outage = False
        for event in events:
            if event.id in sent or (after is not None and event.id <= after):
                continue
            sent[event.id] = _id_ms(event.id, prefix)
            yield f"data: {json.dumps(event_object(event).model_dump(), separators=(',', ':'))}\n\n"
            last_beat = time.monotonic()
        if sent:
            newest = max(sent.values())
            since_ms = max(since_ms, newest - LATE_WINDOW_MS)
            for event_id in [k for k, ms in sent.items() if ms < since_ms]:
                del sent[event_id]
        if status is None or status in TERMINAL_STATUSES:
            yield "data: [DONE]\n\n"
            return
        if await request.is_disconnected():
            return
        if time.monotonic() - last_beat > KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_beat = time.monotonic()
        await asyncio.sleep(poll_s)
