from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

FilePurpose = Literal["fine-tune", "fine-tune-results", "export", "assistants", "batch", "vision", "user_data",
                      "evals"]
UPLOAD_PURPOSES = ("fine-tune", "assistants", "batch", "vision", "user_data", "evals")
EXPORT_PURPOSE = "export"  # an export's artifacts (a GGUF, a Modelfile, a .tar), written by a worker, never uploaded


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    expires_at: int | None = None
    # extension: the engine's validation report (format, counts, and the first 100 bad lines with their numbers and
    # codes; every one is counted); in lists, the report without its list of bad lines
    validation: dict[str, Any] | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
