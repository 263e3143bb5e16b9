"""The FastAPI app. `create_app(settings)` builds it (tests pass their own settings); `factory()` is for
`uvicorn --factory app.main:factory`; `run()` (also `python -m app`) validates the settings, prepares the database
and serves on UNSLOTH_HOST:UNSLOTH_PORT. A bad setting is one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import PurePosixPath

from fastapi import FastAPI

from app.api.openapi import install_openapi
from app.api.router import root, route_template, v1
from app.console import install_console
from app.core.config import Settings, SettingsError, load_settings
from app.core.context import AppContext
from app.core.errors import install_error_handlers
from app.core.middleware import (
    AuthGateMiddleware,
    BodyLimitMiddleware,
    FairShareMiddleware,
    MetricsMiddleware,
    PathGuardMiddleware,
    RateLimitMiddleware,
)
from app.core.rate_limit import RateLimiter
from app.core.threads import apply_torch_threads
from app.services.key_gate import KeyGate

log = logging.getLogger("app")

UPLOAD_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the file part


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app and prepare its database (migrate or check, admin keys, base models). Raises SettingsError."""
    settings = settings or load_settings()
    ctx = AppContext.build(settings)
    try:
        ctx.prepare_database()
    except BaseException:
        ctx.close()
        raise
    limiter = RateLimiter.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.inference.warm_up()  # before the first request, not during one
        try:
            yield
        finally:
            limiter.close()
            ctx.close()

    # Exact paths, as OpenAI's: no 307 from `/v1/files/` to `/v1/files` (a redirect built from the Host header).
    app = FastAPI(title="Unsloth service", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="OpenAI-compatible fine-tuning and completions for Llama-architecture models.")
    app.state.ctx = ctx
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(v1)
    app.include_router(root)
    install_console(app)  # the web console at /

    def body_limit(path: str) -> int:
        if PurePosixPath(path) == PurePosixPath("/v1/files"):
            return settings.max_upload_bytes + UPLOAD_OVERHEAD
        return settings.max_request_bytes

    # The last added runs first: metrics, the path guard, the key gate, the key's rate limit, its fair share of
    # the API's turns, the body limit.
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.add_middleware(FairShareMiddleware, share=ctx.fair_share, retry_after_s=settings.retry_after_s)
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    gate = KeyGate(ctx.sessions)
    app.add_middleware(AuthGateMiddleware, identify=gate.identify, remembered=gate.remembered)
    app.add_middleware(PathGuardMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=ctx.metrics, route_template=route_template)
    return app


def _exit_on_settings_error(error: SettingsError) -> None:
    print(f"unsloth: {error}", file=sys.stderr)
    raise SystemExit(2)


def factory() -> FastAPI:
    try:
        settings = load_settings()
        apply_torch_threads(settings.torch_threads)
        return create_app(settings)
    except SettingsError as e:
        _exit_on_settings_error(e)
        raise


def run(settings: Settings | None = None) -> None:
    import uvicorn

    try:
        settings = settings or load_settings()
        logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        apply_torch_threads(settings.torch_threads)  # before the first completion loads torch
        app = create_app(settings)
    except SettingsError as e:
        _exit_on_settings_error(e)
        return
    ctx: AppContext = app.state.ctx
    print(f"unsloth: serving on http://{settings.host}:{settings.port}/v1", file=sys.stderr)
    if ctx.embedded_key:
        print(f"unsloth: API key: {ctx.embedded_key}  (kept in {settings.api_key_file})", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=10)
