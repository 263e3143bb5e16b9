"""Whether an error means the server's storage is full, wherever the write was: a file (the kernel's ENOSPC, or
EDQUOT for a quota), or the database (SQLite's SQLITE_FULL, "database or disk is full", when its file lives on the
full disk, as in the embedded mode; PostgreSQL's disk_full). One answer for the API (507 `storage_full`) and for the
worker (the job pauses): nothing the user sent is wrong, and the same request succeeds once space is freed."""

from __future__ import annotations

import errno
import re
import sqlite3

FULL = (errno.ENOSPC, errno.EDQUOT)
# Rust libraries (safetensors, tokenizers) raise their own exception types; the OS error is in the message.
FULL_IN_MESSAGE = re.compile(rf"\(os error ({'|'.join(str(n) for n in FULL)})\)")
PG_DISK_FULL = "53100"  # SQLSTATE disk_full: "could not extend file ...: No space left on device"
# numpy's `ndarray.tofile` (the gguf package writes a GGUF's tensors with it) reports a short write as an OSError
# without an errno: "20480 requested and 6384 written". Writing a regular file, that only happens when the disk (or a
# quota) has no room left.
SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def is_storage_full(error: BaseException) -> bool:
    """True when `error`, or an error that caused it (SQLAlchemy wraps the driver's), is a write refused for lack
    of space."""
    seen: BaseException | None = error
    while seen is not None:
        if _full(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in FULL or (error.errno is None and bool(SHORT_WRITE.match(str(error))))
    if isinstance(error, sqlite3.Error):  # the primary code: SQLITE_FULL has no extended codes today, but may
        return (getattr(error, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_FULL
    if getattr(error, "sqlstate", None) == PG_DISK_FULL:  # psycopg's errors, without importing psycopg here
        return True
    return bool(FULL_IN_MESSAGE.search(str(error)))
