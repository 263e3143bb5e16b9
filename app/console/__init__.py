"""The web console: static files (an HTML page, ES modules, CSS and the vendored uPlot chart library) served at `/`
and under `/console/`. It runs in the browser and does everything through the public `/v1` API with the user's key
(`Authorization: Bearer`), so it can do nothing the key cannot; the server holds no console state.

Every console response carries a strict Content-Security-Policy (scripts, styles and connections from this origin
only: no inline script, no third party, no framing) and the other headers a page holding an API key should send."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data: blob:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors, for browsers that predate it
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Cache-Control": "no-cache",  # revalidated (ETag) on each load, so an upgraded server's files are picked up
}


class ConsoleFiles(StaticFiles):
    """Starlette's static files, with the console's headers on every file."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


router = APIRouter(include_in_schema=False)


@router.api_route("/", methods=["GET", "HEAD"])
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=HEADERS)


def install_console(app: FastAPI) -> None:
    """`/` answers the page, `/console/...` its assets; nothing else is claimed (other paths keep the API's 404)."""
    app.include_router(router)
    app.mount("/console", ConsoleFiles(directory=STATIC_DIR), name="console")
