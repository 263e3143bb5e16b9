"""One error envelope for every non-2xx response: `{"error": {"message", "type", "param", "code"}}` (OpenAI's).

Services raise `APIError` (or a helper below); handlers turn it, FastAPI's validation errors, unknown routes, wrong
methods and anything unexpected into the envelope. No stack trace ever leaves the server: unexpected errors are
logged with their traceback and answered with a generic 500. A commit refused because the database's disk is full is
507 `storage_full` (as an upload that fills the disk is), not 503 `database_unavailable`: the database answers,
its disk has no room.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.core.disk_full import is_storage_full

log = logging.getLogger("app.errors")

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def not_found(kind: str, id: str, *, param: str | None = None, code: str | None = None) -> APIError:
    code = code or f"{kind.replace(' ', '_')}_not_found"
    return APIError(404, f"No {kind} found with id '{id}'.", param=param, code=code)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="unsloth"'})


def json_error(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


# ---- validation errors: FastAPI's 422 list -> one 400 naming the field ----

_LOC_ROOTS = {"body", "query", "path", "header", "cookie"}
_BRANCH_LABELS = {"int", "float", "str", "bool", "list", "dict", "none", "bytes"}


def loc_to_param(loc: Sequence[Any]) -> str | None:
    """("body", "method", "supervised", "hyperparameters", "n_epochs") -> "method.supervised.hyperparameters.n_epochs";
    pydantic's union / tagged-union branch names (e.g. "int", "literal['auto']") are dropped."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 0 and item in _LOC_ROOTS:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        text = str(item)
        if "[" in text or "(" in text or text.startswith("constrained-") or text in _BRANCH_LABELS:
            continue  # a union branch label, not a field
        parts.append(text)
    param = ".".join(parts).replace(".[", "[")
    return param or None


def _is_type_error(err: Mapping[str, Any]) -> bool:
    """A union branch that did not match (wrong type / literal), as opposed to a violated constraint."""
    kind = str(err.get("type", ""))
    return kind.endswith(("_type", "_parsing")) or kind in ("literal_error", "is_instance_of")


def _pick(errors: list[Mapping[str, Any]]) -> tuple[str | None, str, str]:
    """(param, message, code) for a list of pydantic errors: a missing field first, then an unknown one, then a
    violated constraint, and only then "wrong type" errors, whose messages are joined (one per union branch)."""
    if not errors:
        return None, "Invalid request.", "invalid_value"
    for kind, code in (("missing", "missing_required_parameter"), ("extra_forbidden", "unknown_parameter")):
        err = next((e for e in errors if e.get("type") == kind), None)
        if err is not None:
            param = loc_to_param(err.get("loc", ()))
            message = (f"Missing required parameter: '{param}'." if kind == "missing"
                       else f"Unrecognized request argument supplied: {param}")
            return param, message, code
    invalid = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if invalid is not None:
        detail = (invalid.get("ctx") or {}).get("error")
        return None, ("We could not parse the JSON body of your request: it is not valid JSON"
                      f"{f' ({detail})' if detail else ''}."), "invalid_json"
    constraint = [e for e in errors if not _is_type_error(e)]
    chosen = max(constraint or errors, key=lambda e: len(e.get("loc", ())))
    param = loc_to_param(chosen.get("loc", ()))
    if constraint:
        messages = [str(chosen.get("msg", "invalid value"))]
    else:
        messages = list(dict.fromkeys(str(e.get("msg")) for e in errors if loc_to_param(e.get("loc", ())) == param))
    text = " or ".join(m.removeprefix("Value error, ").removeprefix("Input should be ") for m in messages)
    if not constraint and all(m.startswith("Input should be ") for m in messages):
        text = "Input should be " + text
    if param is None:
        return None, "We could not parse the JSON body of your request. The body must be a JSON object.", \
            "invalid_value"
    return param, f"Invalid value for '{param}': {text}.", "invalid_value"


async def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    param, message, code = _pick(list(exc.errors()))
    return json_error(400, error_body(message, param=param, code=code))


async def _api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return json_error(exc.status, exc.body(), exc.headers)


METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's)."""
    allowed = []
    for method in METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        body = error_body(f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
    elif exc.status_code == 405:
        body = error_body(f"Method {request.method} is not allowed for {request.url.path}.", code="method_not_allowed")
        headers["Allow"] = ", ".join(allowed_methods(request)) or headers.get("Allow", "")
    else:
        body = error_body(str(exc.detail), code=None)
    return json_error(exc.status_code, body, headers)


def database_unavailable() -> APIError:
    return APIError(503, "The database is unavailable; try again shortly.", type="service_unavailable",
                    code="database_unavailable", headers={"Retry-After": "5"})


def storage_full() -> APIError:
    """The server's storage is full: nothing the client can change in its request, so 507 (Insufficient Storage),
    and the same request may succeed once space is freed. A database write that failed rolled back with it."""
    return APIError(507, "The server's storage is full; the request could not be saved. Try again later.",
                    type="server_error", code="storage_full", headers={"Retry-After": "60"})


async def _database_error_handler(_: Request, exc: Exception) -> JSONResponse:
    full = is_storage_full(exc)  # SQLite's "database or disk is full" is an OperationalError, as an outage is
    log.error("%s: %s", "storage full" if full else "database unavailable", exc)
    error = storage_full() if full else database_unavailable()
    return json_error(error.status, error.body(), error.headers)


def database_busy() -> APIError:
    """Every pooled connection stayed in use for the pool's timeout: the service is saturated, not broken."""
    return APIError(503, "The service is busy (every database connection is in use); try again shortly.",
                    type="service_unavailable", code="database_busy", headers={"Retry-After": "2"})


async def _pool_timeout_handler(_: Request, exc: Exception) -> JSONResponse:
    log.warning("database connection pool exhausted: %s", exc)
    error = database_busy()
    return json_error(error.status, error.body(), error.headers)


async def _unexpected_handler(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return json_error(500, error_body("The server had an error while processing your request.", type="server_error",
                                      code="internal_error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(OperationalError, _database_error_handler)
    app.add_exception_handler(PoolTimeoutError, _pool_timeout_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
