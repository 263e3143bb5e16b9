"""Shapes shared by every resource: the error envelope and cursor-paged lists."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

# ---- strings that reach the database or the filesystem ----
# Ids never hold control characters, and no stored text holds a NUL (PostgreSQL refuses it in text and jsonb, and
# cannot even compare a string that has one). Both are refused as 400s naming the field; the OpenAPI document
# says so with a `pattern` (ECMA-262 and Python read these two the same way).

CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]*$"
NO_NUL_PATTERN = r"^[^\x00]*$"


def check_identifier(value: str) -> str:
    if CONTROL_CHARACTERS.search(value):
        raise ValueError("must not contain control characters")
    return value


def check_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Identifier = Annotated[str, AfterValidator(check_identifier), Field(json_schema_extra={"pattern": NO_CONTROL_PATTERN})]
Text = Annotated[str, AfterValidator(check_text), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool


ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 429, 500, 503)
}

ListObject = Literal["list"]
