"""Files: stored under server-generated names, validated line by line with the engine's validator on upload."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from app.core import ids
from app.core.config import Settings
from app.core.errors import APIError, bad_request, not_found
from app.db.base import unix, utcnow
from app.db.models import TERMINAL_STATUSES, ApiKey, File, Job
from app.schemas.files import EXPORT_PURPOSE, UPLOAD_PURPOSES, FileList, FileObject
from app.services import storage
from app.services.common import owned, page
from app.services.uploads import Upload

log = logging.getLogger("app.files")


def check_purpose(purpose: str | None) -> str:
    if not purpose:
        raise bad_request("Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter")
    if purpose not in UPLOAD_PURPOSES:
        raise bad_request(f"Invalid value for 'purpose': {purpose!r}; use one of {', '.join(UPLOAD_PURPOSES)}.",
                          param="purpose")
    return purpose


# What a stored report keeps: every error is counted (n_errors, error_counts), the first REPORT_ERRORS are listed,
# each message cut at REPORT_MESSAGE_CHARS. A 4,000-byte upload of bad lines used to store and return a 140 KB report.
REPORT_ERRORS = 100
REPORT_MESSAGE_CHARS = 300


def validate_training_file(path: Path) -> dict[str, Any]:
    """The engine's report without a tokenizer: structure, format, example counts and the first bad lines."""
    from unsloth_core.data import validate_file

    report = validate_file(path, max_errors=REPORT_ERRORS).to_dict()
    for error in report["errors"]:
        if len(error["message"]) > REPORT_MESSAGE_CHARS:
            error["message"] = error["message"][: REPORT_MESSAGE_CHARS - 3] + "..."
    return report


def report_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """The report without its list of errors (its counts stay): what a file list shows."""
    return None if report is None else {k: v for k, v in report.items() if k != "errors"}


def check_quota(*, session: Session, settings: Settings, key: ApiKey, incoming_bytes: int = 0) -> None:
    """One key's stored files are capped in number and bytes (`max_files_per_key`, `max_file_bytes_per_key`), so it
    cannot fill the disk the others share: 429 insufficient_quota past either. Exports' artifacts are not uploads:
    they count against the key's exports (`max_exports_per_key`), so a large GGUF never blocks an upload."""
    count, used = session.execute(select(func.count(), func.coalesce(func.sum(File.bytes), 0))
                                  .where(File.owner_id == key.id, File.deleted_at.is_(None),
                                         File.purpose != EXPORT_PURPOSE)).one()
    if incoming_bytes == 0 and count >= settings.max_files_per_key:
        raise _quota(f"This API key stores {count} files, its limit; delete some first.")
    if used + incoming_bytes > settings.max_file_bytes_per_key:
        raise _quota(f"This upload would take this API key's files to {used + incoming_bytes} bytes, over its limit "
                     f"of {settings.max_file_bytes_per_key}; delete some first.")


def _quota(message: str) -> APIError:
    # Waiting does not cure a full quota, deleting does: no Retry-After, and `x-should-retry: false` tells the openai
    # SDKs not to retry it (they retry a 429 otherwise).
    return APIError(429, message, type="insufficient_quota", code="insufficient_quota", param="file",
                    headers={"x-should-retry": "false"})


def create_file(*, session: Session, settings: Settings, owner: ApiKey, upload: Upload, staged: Path,
                purpose: str) -> File:
    file_id = ids.new_id(ids.FILE)
    relative = storage.file_relative(file_id)
    final = settings.data_dir / relative
    os.replace(staged, final)
    status, details, report = "processed", None, None
    if purpose == "fine-tune":
        report = validate_training_file(final)
        if not report["ok"]:
            status = "error"
            details = _summary(report)
    row = File(id=file_id, owner_id=owner.id, filename=upload.filename or "upload.jsonl", purpose=purpose,
               bytes=upload.size, status=status, status_details=details, validation=report,
               validation_summary=report_summary(report), path=str(relative), sha256=upload.sha256)
    session.add(row)
    try:
        session.commit()
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    return row


def _summary(report: dict[str, object]) -> str:
    errors = report.get("errors") or []
    assert isinstance(errors, list)
    n = report.get("n_errors", len(errors))
    shown = "; ".join(f"line {e['line']}: {e['code']}: {e['message']}" if e.get("line") is not None
                      else f"{e['code']}: {e['message']}" for e in errors[:3])
    return f"{n} invalid line(s): {shown}" + (" ..." if isinstance(n, int) and n > 3 else "")


def get_file(*, session: Session, key: ApiKey, file_id: str, param: str | None = None) -> File:
    query = owned(select(File).where(File.id == file_id, File.deleted_at.is_(None)), File.owner_id, key)
    row = session.scalar(query)
    if row is None:
        raise not_found("file", file_id, param=param, code="file_not_found")
    return row


def list_files(*, session: Session, key: ApiKey, after: str | None, limit: int, order: str,
               purpose: str | None) -> FileList:
    # Summaries only: each row's whole report is never read for a list (`GET /v1/files/{id}` returns it).
    query = owned(select(File).options(defer(File.validation, raiseload=True)).where(File.deleted_at.is_(None)),
                  File.owner_id, key)
    if purpose:
        query = query.where(File.purpose == purpose)
    rows, more = page(session, query, File.id, after=after, limit=limit, descending=order == "desc")
    data = [file_object(r, summary=True) for r in rows]
    return FileList(data=data, has_more=more, first_id=data[0].id if data else None,
                    last_id=data[-1].id if data else None)


def delete_file(*, session: Session, settings: Settings, key: ApiKey, file_id: str) -> None:
    row = get_file(session=session, key=key, file_id=file_id)
    busy = session.scalar(select(Job.id).where(Job.status.not_in(TERMINAL_STATUSES),
                                               (Job.training_file == file_id) | (Job.validation_file == file_id))
                          .limit(1))
    if busy is not None:
        raise bad_request(f"File {file_id} is in use by fine-tuning job {busy}; cancel the job first.",
                          code="file_in_use")
    row.deleted_at = utcnow()
    session.commit()
    storage.remove_file_entry(settings, row.path)


def readable_content(settings: Settings, row: File, param: str | None = None) -> Path:
    """A file's bytes for the API: 404 when they are gone (or lead out of the files dir), never a 500."""
    try:
        path = storage.file_content(settings, row.path)
    except OSError:
        path = None
    if path is None or not path.is_file():
        raise APIError(404, f"The content of file {row.id} is no longer available.", param=param,
                       code="file_content_missing")
    return path


def file_object(row: File, summary: bool = False) -> FileObject:
    """The API's file object; with `summary`, its report without the list of bad lines (as lists return it)."""
    return FileObject(id=row.id, bytes=row.bytes, created_at=unix(row.created_at) or 0, filename=row.filename,
                      purpose=row.purpose, status=row.status,  # type: ignore[arg-type]
                      status_details=row.status_details, expires_at=unix(row.expires_at),
                      validation=row.validation_summary if summary else row.validation)
