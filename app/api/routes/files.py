from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import PathId, QueryId, StrictRoute
from app.core.errors import APIError, json_error
from app.schemas.files import FileDeleted, FileList, FileObject
from app.services import files, storage
from app.services.uploads import receive_upload

router = APIRouter(prefix="/files", tags=["files"], route_class=StrictRoute)

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": [
        "fine-tune", "assistants", "batch", "vision", "user_data", "evals"]}}}}}}}


BINARY = {"schema": {"type": "string", "format": "binary"}}
CONTENT_RANGES = {
    "parameters": [{"name": "Range", "in": "header", "required": False, "schema": {"type": "string"},
                    "description": "RFC 9110 byte ranges (`bytes=0-1023`, `bytes=-500`); a malformed one is "
                                   "ignored (the whole file, 200)"}],
    "responses": {"206": {"description": "The range asked for (several ranges: multipart/byteranges)",
                          "headers": {"Content-Range": {"schema": {"type": "string"}}},
                          "content": {"application/octet-stream": BINARY, "multipart/byteranges": BINARY}}},
}


class _Unsatisfiable(Exception):  # not Starlette's own, which its FileResponse answers in plain text
    def __init__(self, size: int) -> None:
        self.size = size


class FileContent(FileResponse):
    """Starlette's FileResponse (streamed, Content-Length, ranges), answering as the rest of the API does: a
    malformed `Range` is ignored (RFC 9110 14.2: the whole file), and one that no byte of the file satisfies is 416
    with the error envelope and `Content-Range: bytes */<size>` (Starlette answers both in plain text)."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []
        except RangeNotSatisfiable:
            raise _Unsatisfiable(file_size) from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except _Unsatisfiable as e:  # raised before anything was sent
            error = APIError(416, f"The range asked for is outside the file ({e.size} bytes).", param="Range",
                             code="range_not_satisfiable", headers={"Content-Range": f"bytes */{e.size}"})
            await json_error(error.status, error.body(), error.headers)(scope, receive, send)


@router.post("", openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> FileObject:
    """Streams the upload to disk (size and line caps enforced as it arrives), then validates every line."""
    await run_in_threadpool(files.check_quota, session=session, settings=ctx.settings, key=key)
    session.close()  # no database connection is held while the body arrives (the key stays loaded)
    staged = storage.staging_path(ctx.settings)
    upload = await receive_upload(request, dest=staged, max_bytes=ctx.settings.max_upload_bytes,
                                  max_lines=ctx.settings.max_file_lines,
                                  idle_timeout_s=ctx.settings.upload_idle_timeout_s)
    try:
        purpose = files.check_purpose(upload.fields.get("purpose"))
        await run_in_threadpool(files.check_quota, session=session, settings=ctx.settings, key=key,
                                incoming_bytes=upload.size)
        row = await run_in_threadpool(lambda: files.create_file(session=session, settings=ctx.settings, owner=key,
                                                                upload=upload, staged=staged, purpose=purpose))
    finally:
        staged.unlink(missing_ok=True)
    return files.file_object(row)


@router.get("")
def list_files(session: SessionDep, key: CurrentKey, after: QueryId = None,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000, order: Literal["asc", "desc"] = "desc",
               purpose: QueryId = None) -> FileList:
    return files.list_files(session=session, key=key, after=after, limit=limit, order=order, purpose=purpose)


@router.get("/{file_id}")
def retrieve_file(file_id: PathId, session: SessionDep, key: CurrentKey) -> FileObject:
    return files.file_object(files.get_file(session=session, key=key, file_id=file_id))


@router.delete("/{file_id}")
def delete_file(file_id: PathId, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> FileDeleted:
    files.delete_file(session=session, settings=ctx.settings, key=key, file_id=file_id)
    return FileDeleted(id=file_id, deleted=True)


@router.get("/{file_id}/content", response_class=FileResponse, openapi_extra=CONTENT_RANGES)
def file_content(file_id: PathId, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> FileResponse:
    """The bytes, streamed, with Content-Length; a `Range` request (resuming a large export's download) gets 206
    with the part asked for."""
    row = files.get_file(session=session, key=key, file_id=file_id)
    return FileContent(files.readable_content(ctx.settings, row), media_type="application/octet-stream",
                       filename=row.filename)
