"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streams): an API-key gate that answers before any
body is read, per-key request rate limits (also before the body), a request body cap enforced while the body streams
in, and request metrics by route template."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import anyio.to_thread
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import APIError, database_busy, database_unavailable, unauthorized
from app.core.fair_share import FairShare, ShareFull, turn_held
from app.core.metrics import Metrics
from app.core.rate_limit import RateLimiter, route_family
from app.schemas.common import CONTROL_CHARACTERS

log = logging.getLogger("app")


def too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than the limit of {limit} bytes.", code="request_too_large")


class PathGuardMiddleware:
    """A URL whose decoded path holds a control character (`%00`, `%0a`, ...) names nothing: 400, before routing.
    (Route patterns end in `$`, which also matches before a final newline: `/v1/models/tiny-chat%0a` would
    otherwise be an alias of `/v1/models/tiny-chat`.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and CONTROL_CHARACTERS.search(scope["path"]):
            await _send_error(send, APIError(400, "The URL path must not contain control characters.",
                                             code="invalid_url"))
            return
        await self.app(scope, receive, send)


KEY_ID = "api_key_id"  # in the request's `state`: the key AuthGateMiddleware found


class AuthGateMiddleware:
    """A `/v1` request without a live API key is answered 401 before any of its body is read, and its connection
    closed: FastAPI parses a JSON body before the route's key dependency runs, so without this an unauthenticated
    client could make the API parse 16 MiB on the event loop per request. `remembered(token)` (a key found live
    moments ago: its id, or None) is asked here, `identify(token)` (the database's answer) on a worker thread; the
    id is left in the request's state for the rate limits."""

    def __init__(self, app: ASGIApp, identify: Callable[[str], str | None],
                 remembered: Callable[[str], str | None] = lambda _: None, prefix: str = "/v1/") -> None:
        self.app, self.identify, self.remembered, self.prefix = app, identify, remembered, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        token = bearer_token(dict(scope["headers"]).get(b"authorization"))
        if token is None:
            await _send_error(send, unauthorized("You didn't provide an API key. Send it as a Bearer token: "
                                                 "'Authorization: Bearer YOUR_KEY'."))
            return
        try:
            key_id = self.remembered(token) or await anyio.to_thread.run_sync(self.identify, token)
        except SQLAlchemyError as e:  # as a route answers then: 503, retry shortly (the body still unread)
            log.error("database unavailable: %s", e)
            await _send_error(send, database_busy() if isinstance(e, PoolTimeoutError) else database_unavailable())
            return
        if key_id is None:
            await _send_error(send, unauthorized("Incorrect API key provided."))
            return
        scope.setdefault("state", {})[KEY_ID] = key_id
        await self.app(scope, receive, send)


def known_key(scope: Scope) -> str | None:
    """The id of the key AuthGateMiddleware let this HTTP request in with, else None."""
    return scope.get("state", {}).get(KEY_ID) if scope["type"] == "http" else None


class RateLimitMiddleware:
    """Counts each request of a known key (AuthGateMiddleware's) in its route family: past the family's limit the
    answer is 429 before any of the body is read, and every answer carries OpenAI's `x-ratelimit-*-requests`
    headers. A counter that waits on Redis runs on a worker thread; the in-process one runs here."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key_id = known_key(scope)
        family = route_family(scope["path"]) if key_id is not None else None
        if key_id is None or family is None:
            await self.app(scope, receive, send)
            return
        if self.limiter.blocking:
            window = await anyio.to_thread.run_sync(self.limiter.check, key_id, family)
        else:
            window = self.limiter.check(key_id, family)
        if window is None:
            await self.app(scope, receive, send)
            return
        if not window.allowed:  # the connection is kept when there is no body to skip
            await _send_error(send, window.error(family), close=_may_have_body(scope))
            return
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in window.headers().items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class FairShareMiddleware:
    """Runs a known key's request in one of its fair-share slots (app.core.fair_share), before any of its body is
    read; the slot is given back when the answer starts (or the request ends without one). A key with a full queue
    is answered 429 with Retry-After."""

    def __init__(self, app: ASGIApp, share: FairShare, retry_after_s: int) -> None:
        self.app, self.share, self.retry_after_s = app, share, retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key_id = known_key(scope)
        if key_id is None:
            await self.app(scope, receive, send)
            return
        try:
            await self.share.acquire(key_id)
        except ShareFull:
            await _send_error(send, too_many_in_flight(self.share.queue_per_key, self.retry_after_s),
                              close=_may_have_body(scope))
            return
        held = True

        def give_back() -> None:
            nonlocal held
            if held:
                held = False
                self.share.release(key_id)

        async def send_releasing(message: Message) -> None:
            if message["type"] == "http.response.start":
                give_back()
            await send(message)

        try:
            with turn_held(give_back):
                await self.app(scope, receive, send_releasing)
        finally:
            give_back()


def too_many_in_flight(queued: int, retry_after_s: int) -> APIError:
    return APIError(429, f"This API key already has {queued} requests waiting for their turn; retry after "
                         f"{retry_after_s} s.", code="too_many_requests_in_flight", type="requests",
                    headers={"Retry-After": str(retry_after_s)})


def bearer_token(header: bytes | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme in any case, as HTTPBearer reads it), else None."""
    if not header:
        return None
    scheme, _, token = header.decode("latin-1").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class BodyLimitMiddleware:
    """Refuses a declared Content-Length over the limit at once, and counts the bytes actually received (a small
    Content-Length cannot be trusted): past the limit, reading the body raises a 413 `APIError`."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, too_large(limit))
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


def _may_have_body(scope: Scope) -> bool:
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


async def _send_error(send: Send, error: APIError, close: bool = True) -> None:
    """Answer before the body is read. `close`: the connection is closed after the answer, so the body (if any)
    is never read (on a kept connection the server would read and drop all of it)."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, route_template: Callable[[Scope], str]) -> None:
        self.app, self.metrics, self.route_template = app, metrics, route_template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = self.route_template(scope)
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
