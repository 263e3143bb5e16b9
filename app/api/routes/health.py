from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import CtxDep
from app.api.routing import StrictRoute
from app.core.errors import APIError, unauthorized
from app.core.middleware import bearer_token

router = APIRouter(tags=["health"], route_class=StrictRoute)


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready")
def ready(ctx: CtxDep) -> dict[str, Any]:
    """The database and the broker answer (as of at most `UNSLOTH_PROBE_CACHE_S` ago); 503 naming what does not."""
    problems = ctx.readiness() if ctx.readiness is not None else ctx.unready()
    if problems:
        raise APIError(503, f"Not ready: {'; '.join(problems)}.", type="service_unavailable", code="not_ready")
    return {"status": "ready", "database": "ok", "broker": "ok"}


@router.get("/metrics", response_class=Response)
def metrics(ctx: CtxDep, request: Request) -> Response:
    """Prometheus' text format; with `UNSLOTH_METRICS_TOKEN` set, only for that bearer token. (The header is read
    here, not declared as the API's security scheme: by default the route is open, and the schema says so.)"""
    token = ctx.settings.metrics_token
    given = bearer_token(request.headers.get("authorization", "").encode("latin-1"))
    if token is not None and not (given is not None and hmac.compare_digest(given, token.get_secret_value())):
        raise unauthorized("/metrics needs the metrics token (UNSLOTH_METRICS_TOKEN) as a Bearer token.")
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
