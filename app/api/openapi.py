"""The OpenAPI document, with the error responses the API really gives: FastAPI's default 422 validation answer is
replaced by our envelope on 400, 401, 404 and the rest, declared per operation."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "code": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}},
}
DESCRIPTIONS = {"400": "Invalid request", "401": "Missing or wrong API key", "403": "Not allowed",
                "404": "Not found (or another key's)", "409": "Changing state; retry", "413": "Body too large",
                "416": "Range not satisfiable (outside the file)", "422": "Idempotency-Key reused with another body",
                "429": "Too many requests, generations or stored objects for this key; retry after",
                "500": "Server error", "503": "Database or broker unavailable",
                "507": "The server's storage is full; retry after"}
V1_ERRORS = ("400", "401", "404", "413", "429", "500", "503")  # 429: the key's request rate (any /v1 route)
EXTRA: list[tuple[str, str, tuple[str, ...]]] = [  # (method, path pattern, statuses)
    ("post", r"^/v1/fine_tuning/jobs$", ("422",)),
    ("post", r"^/v1/fine_tuning/jobs/\{job_id\}/(cancel|pause|resume)$", ("409",)),
    ("post", r"^/v1/exports$", ("422",)),
    ("post", r"^/v1/exports/\{export_id\}/cancel$", ("409",)),
    ("get", r"^/v1/files/\{file_id\}/content$", ("416",)),
    ("delete", r"^/v1/models/", ("403",)),
    ("get", r"^/ready$", ("503",)),
    # 507: a write meets a full disk (an upload's file, or any commit). Every POST and DELETE writes; of the GETs,
    # only the models' (a base model directory found on disk gets its row then). A key's last-use stamp is skipped.
    ("post", r"^/v1/", ("507",)),
    ("delete", r"^/v1/", ("507",)),
    ("get", r"^/v1/models", ("507",)),
]


# 200 bodies other than JSON: SSE streams (`stream: true`, `?stream=true`), raw file bytes, Prometheus text.
# An SSE event (OpenAPI 3.1: `schema` describes each event): `data` is one JSON chunk, or `[DONE]` at the end.
SSE = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}}}
OTHER_CONTENT: list[tuple[str, str, dict[str, Any]]] = [  # (method, path pattern, extra 200 content)
    ("post", r"^/v1/(chat/)?completions$", SSE),
    ("get", r"^/v1/fine_tuning/jobs/\{job_id\}/events$", SSE),
    ("get", r"^/v1/files/\{file_id\}/content$", {"application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}),
    ("get", r"^/metrics$", {"text/plain": {"schema": {"type": "string"}}}),
]
# Headers every answer with that status carries.
HEADERS = {
    "401": {"WWW-Authenticate": {"description": "Bearer (RFC 6750)", "required": True,
                                 "schema": {"type": "string"}}},
    "429": {"Retry-After": {"description": "Seconds to wait before retrying", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
    "416": {"Content-Range": {"description": "bytes */<the file's size>", "required": True,
                              "schema": {"type": "string", "pattern": "^bytes \\*/[0-9]+$"}}},
    "507": {"Retry-After": {"description": "Seconds to wait before retrying (once space is freed)", "required": True,
                            "schema": {"type": "string", "pattern": "^[0-9]+$"}}},
}


def _error(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    if status in HEADERS:
        response["headers"] = HEADERS[status]
    return response


def install_openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorResponse"] = ERROR_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                statuses = list(V1_ERRORS if path.startswith("/v1/") else ("500",))
                statuses += [s for m, pattern, more in EXTRA if m == method and re.search(pattern, path) for s in more]
                for status in statuses:
                    responses[status] = _error(status)
                ok = responses.get("200")
                for m, pattern, content in OTHER_CONTENT:
                    if ok is not None and m == method and re.search(pattern, path):
                        ok.setdefault("content", {}).update(content)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return openapi

