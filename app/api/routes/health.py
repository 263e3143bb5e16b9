from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.api.deps import CtxDep
from app.api.routing import StrictRoute
from app.core.errors import APIError

router = APIRouter(tags=["health"], route_class=StrictRoute)


@router.get("/health")
def health() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/ready")
def ready(ctx: CtxDep) -> dict[str, Any]:
    """The database and the broker answer; 503 naming what does not."""
    problems = []
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        problems.append(f"database: {type(e).__name__}")
    try:
        ctx.broker.ping()
    except Exception as e:
        problems.append(f"broker: {type(e).__name__}")
    if problems:
        raise APIError(503, f"Not ready: {'; '.join(problems)}.", type="service_unavailable", code="not_ready")
    return {"status": "ready", "database": "ok", "broker": "ok"}


@router.get("/metrics", response_class=Response)
def metrics(ctx: CtxDep) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
