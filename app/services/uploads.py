"""A streaming multipart/form-data reader for `POST /v1/files`: the file part goes straight to a server-named file
on disk (never whole in memory, never through a spooled temp file), hashed and its lines counted on the way; the size
and line caps stop the upload as soon as they are crossed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.core.errors import APIError, bad_request
from app.schemas.common import CONTROL_CHARACTERS

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 16
FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    size: int = 0
    lines: int = 0
    sha256: str = ""


def _label(raw_name: bytes) -> str:
    """The client's file name as a label (it never becomes a path): UTF-8 (bad bytes replaced), without control
    characters (PostgreSQL refuses a NUL), at most 255 characters."""
    name = CONTROL_CHARACTERS.sub("", raw_name.decode("utf-8", "replace"))[-255:]
    return name or "upload.jsonl"


class _Reader:
    def __init__(self, dest: Path, max_bytes: int, max_lines: int) -> None:
        self.dest, self.max_bytes, self.max_lines = dest, max_bytes, max_lines
        self.upload = Upload()
        self.hash = hashlib.sha256()
        self.out: IO[bytes] | None = None
        self.last_byte = b""
        self.parts = 0
        self._name = b""
        self._value = b""
        self._disposition = b""
        self._field: str | None = None
        self._buffer = bytearray()
        self._in_file = False

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise bad_request("Too many parts in the multipart body.", code="invalid_multipart")
        self._disposition, self._field, self._buffer, self._in_file = b"", None, bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition = self._value
        self._name, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise bad_request("A multipart part has no name.", code="invalid_multipart")
        self._field = name.decode("utf-8", "replace")
        if self._field == "file":
            if self.out is not None:
                raise bad_request("Send one file per upload.", param="file", code="invalid_multipart")
            self._in_file = True
            raw_name = options.get(b"filename", b"upload.jsonl")
            self.upload.filename = _label(raw_name)
            self.out = self.dest.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if not chunk:
            return
        if not self._in_file:
            if len(self._buffer) + len(chunk) > MAX_FIELD_BYTES:
                raise bad_request(f"The form field '{self._field}' is too long.", param=self._field)
            self._buffer.extend(chunk)
            return
        assert self.out is not None
        up = self.upload
        up.size += len(chunk)
        if up.size > self.max_bytes:
            raise APIError(413, f"The file is larger than the limit of {self.max_bytes} bytes.", param="file",
                           code="file_too_large")
        up.lines += chunk.count(b"\n")
        if up.lines > self.max_lines:
            raise bad_request(f"The file has more than the limit of {self.max_lines} lines.", param="file",
                              code="too_many_lines")
        self.hash.update(chunk)
        self.last_byte = chunk[-1:]
        self.out.write(chunk)

    def on_part_end(self) -> None:
        if self._in_file:
            self._in_file = False
        elif self._field is not None:
            self.upload.fields[self._field] = self._buffer.decode("utf-8", "replace")

    def finish(self) -> Upload:
        if self.out is None:
            raise bad_request("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        self.out.close()
        up = self.upload
        if up.size and self.last_byte != b"\n":
            up.lines += 1  # a last line without its newline
        if up.lines > self.max_lines:
            raise bad_request(f"The file has more than the limit of {self.max_lines} lines.", param="file",
                              code="too_many_lines")
        up.sha256 = self.hash.hexdigest()
        return up

    def close(self) -> None:
        if self.out is not None and not self.out.closed:
            self.out.close()


async def receive_upload(request: Request, *, dest: Path, max_bytes: int, max_lines: int,
                         idle_timeout_s: float = 60.0) -> Upload:
    """Stream the request's multipart body; the `file` part lands in `dest`. On any error `dest` is removed.
    A body that sends nothing for `idle_timeout_s` is cut off (408): a slow client holds a connection of its own,
    never the service's."""
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise bad_request("Uploads must be multipart/form-data with a 'file' part and a 'purpose' field.",
                          code="invalid_content_type")
    reader = _Reader(dest, max_bytes, max_lines)
    try:
        parser = MultipartParser(params[b"boundary"], reader.callbacks())
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), idle_timeout_s)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise APIError(408, f"The upload sent nothing for {idle_timeout_s:g} s; it was cut off.",
                               code="upload_timeout", headers={"Connection": "close"}) from None
            parser.write(chunk)
        parser.finalize()
        return reader.finish()
    except FormParserError:
        reader.close()
        dest.unlink(missing_ok=True)
        raise bad_request("The multipart body is malformed.", code="invalid_multipart") from None
    except BaseException as e:
        with contextlib.suppress(OSError):  # closing flushes: on a full disk that fails too
            reader.close()
        with contextlib.suppress(OSError):
            dest.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in FULL:
            raise storage_full() from None
        raise


def storage_full() -> APIError:
    """The server's disk is full: nothing the client can change in its request, so 507 (Insufficient Storage), with
    the partial file already removed."""
    return APIError(507, "The server's storage is full; the file was not stored. Try again later.", type="server_error",
                    param="file", code="storage_full", headers={"Retry-After": "60"})
