from fastapi import APIRouter
from starlette.types import Scope

from app.api.routes import (
    admin_keys,
    completions,
    evals,
    exports,
    files,
    graders,
    health,
    jobs,
    models,
    tool_call_checks,
)

V1_PREFIX = "/v1"
_v1_routers = (files.router, jobs.router, graders.router, models.router, completions.router, exports.router,
               evals.router, admin_keys.router, tool_call_checks.router)

v1 = APIRouter(prefix=V1_PREFIX)
for _router in _v1_routers:
    v1.include_router(_router)

root = APIRouter()
root.include_router(health.router)

# Routes of the /v1 routers, by identity: FastAPI may serve an included route as the original object (whose path
# lacks the /v1 prefix) or as a prefixed copy, depending on its version.
_V1_ROUTE_IDS = {id(r) for router in _v1_routers for r in router.routes}


def route_template(scope: Scope) -> str:
    """The matched route's path template (`/v1/files/{file_id}`), for metrics labels; "unmatched" for a 404."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    return V1_PREFIX + path if id(route) in _V1_ROUTE_IDS and not path.startswith(V1_PREFIX + "/") else path
