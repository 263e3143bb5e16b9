from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST

from app.api.deps import CtxDep, bearer
from app.api.routing import StrictRoute
from app.core.errors import APIError, unauthorized

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
def metrics(ctx: CtxDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Response:
    """Prometheus' text format; with `UNSLOTH_METRICS_TOKEN` set, only for that bearer token."""
    token = ctx.settings.metrics_token
    if token is not None and not (credentials is not None
                                  and hmac.compare_digest(credentials.credentials, token.get_secret_value())):
        raise unauthorized("/metrics needs the metrics token (UNSLOTH_METRICS_TOKEN) as a Bearer token.")
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
