"""Stopping an export between its units of work.

An export is one long engine call (merge, write, read back, compare), so a caller that wants to stop it early (the
worker, for a user's cancel) passes `should_stop`: it is asked between tensors while merging, writing and reading
back, and between probe prompts while comparing, and a True there raises ExportCancelled. The export's own atomic
directory then removes what was written, as for any other error. Ask cheaply: it is called hundreds of times.
"""

from __future__ import annotations

from collections.abc import Callable

from unsloth_core.errors import UnslothError

StopCheck = Callable[[], bool]


class ExportCancelled(UnslothError):
    """The export was stopped by its caller's `should_stop`; nothing of it was kept."""


def check_stop(should_stop: StopCheck | None, stage: str) -> None:
    """Raise ExportCancelled when the caller asks to stop; `stage` says where the export was, for the message."""
    if should_stop is not None and should_stop():
        raise ExportCancelled(f"the export was cancelled while {stage}; nothing of it was kept")
