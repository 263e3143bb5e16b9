from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import PathId, QueryId, StrictRoute
from app.schemas.files import FileDeleted, FileList, FileObject
from app.services import files, storage
from app.services.uploads import receive_upload

router = APIRouter(prefix="/files", tags=["files"], route_class=StrictRoute)

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string", "enum": [
        "fine-tune", "assistants", "batch", "vision", "user_data", "evals"]}}}}}}}


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


@router.get("/{file_id}/content", response_class=FileResponse)
def file_content(file_id: PathId, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> FileResponse:
    row = files.get_file(session=session, key=key, file_id=file_id)
    return FileResponse(files.readable_content(ctx.settings, row), media_type="application/octet-stream",
                        filename=row.filename)
