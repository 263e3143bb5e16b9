"""What every route shares: JSON bodies read strictly, and the path-parameter types that keep hostile names out.

- A JSON body must be UTF-8 and hold no unpaired UTF-16 surrogate escape (`"\\ud800"`): such a string is not
  Unicode text, cannot be stored, tokenized or sent back as UTF-8, and is refused at the door (400) rather than
  failing later (a 500 in the tokenizer or while rendering the answer).
- Identifiers in paths and queries (`file_id`, `job_id`, `model_id`, `after`) never hold control characters
  (PostgreSQL cannot even compare a string with a NUL in it): 400 naming the parameter, documented in the OpenAPI
  document as a `pattern`.
- `{job_id:job_id}` matches any path segment except the literal action beside it (`validate`), so
  `/v1/fine_tuning/jobs/validate` is only ever the dry-run: another method there is 405 with `Allow: POST`, not a
  lookup of a job named "validate".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Header, Path, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import AfterValidator
from starlette.convertors import Convertor, register_url_convertor

from app.schemas.common import NO_CONTROL_PATTERN, check_identifier

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def loads_strict(body: bytes) -> Any:
    """`json.loads` for a request body: UTF-8 only, and no unpaired surrogate. Raises json.JSONDecodeError."""
    try:
        text = body.decode("utf-8-sig")  # a leading byte-order mark is allowed (RFC 8259 section 8.1)
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError(f"byte {e.start} is not UTF-8", "", 0) from None
    value = json.loads(text)
    if _SURROGATE_ESCAPE.search(text):  # rare: only then look for a surrogate that did not pair up
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise json.JSONDecodeError("a string holds an unpaired UTF-16 surrogate escape (not Unicode text)",
                                       text, 0) from e
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_strict(await self.body())
        return self._json


class StrictRoute(APIRoute):
    """An APIRoute whose handler reads JSON bodies with `loads_strict`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict_handler


class JobIdConvertor(Convertor[str]):
    """One path segment, except `validate` (the literal route beside `/{job_id}`)."""

    regex = r"(?!validate$)[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", JobIdConvertor())

_ID_SCHEMA = {"pattern": NO_CONTROL_PATTERN}
PathId = Annotated[str, Path(json_schema_extra=_ID_SCHEMA), AfterValidator(check_identifier)]
# An id-like query value (a cursor, a filter): compared with ids, never used as a name.
QueryId = Annotated[str | None, Query(json_schema_extra=_ID_SCHEMA),
                    AfterValidator(lambda v: v if v is None else check_identifier(v))]

# A create's de-duplication: the client's own key, or the openai SDK's retry count (a retry of the same body is the
# same object).
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)]
RetryCount = Annotated[int | None, Header(alias="x-stainless-retry-count", include_in_schema=False)]
