"""A small filesystem of its own (a tmpfs) mounted over a directory for a test: storage that really fills up, so
writes fail with the kernel's own ENOSPC (and SQLite's with SQLITE_FULL, "database or disk is full"). Mounting needs
root with CAP_SYS_ADMIN; where that is not permitted, the test is skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

FILLER = ".filler"


@contextlib.contextmanager
def small_disk(directory: Path, size: str) -> Iterator[Path]:
    """`directory` (existing, its entries hidden meanwhile) is a tmpfs of `size` (`mount -o size=`) inside the block."""
    directory.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs over {directory} here ({mount.stderr.strip() or mount.returncode}): a "
                    "disk-full test needs root with CAP_SYS_ADMIN")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=True)  # still in use: detach it now, free later


def free_bytes(directory: Path) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def fill(directory: Path, leave: int = 0) -> Path:
    """A filler file that leaves about `leave` bytes free on the filesystem of `directory`."""
    filler = directory / FILLER
    chunk = b"\0" * 65536
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):  # OSError: full already
        while (room := free_bytes(directory) - leave) > 0:
            f.write(chunk[:room])
    return filler


def sqlite_file(database_url: str) -> Path:
    return Path(str(make_url(database_url).database))


def fill_database(database: Path) -> Path:
    """Fill the disk a SQLite database (WAL mode) lives on, so that its next write fails with SQLITE_FULL. Its
    write-ahead log is emptied first: a write reuses the log's space already allocated, and would otherwise succeed
    on a full disk for a while."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0, f"{database}: a reader kept the write-ahead log from being emptied"
    return fill(database.parent)
