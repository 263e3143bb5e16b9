"""Server-generated ids: a prefix, 12 hex digits of milliseconds since the epoch, a 4-digit per-process counter and
8 random hex digits. Ids of one kind sort by creation time, so lists order and page by id alone."""

from __future__ import annotations

import secrets
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_id(prefix: str) -> str:
    global _last_ms, _counter
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:  # same millisecond (or a clock step back): keep strictly increasing in this process
            ms, _counter = _last_ms, _counter + 1
            if _counter > 0xFFFF:
                ms, _counter = ms + 1, 0
        else:
            _counter = 0
        _last_ms = ms
        return f"{prefix}{ms:012x}{_counter:04x}{secrets.token_hex(4)}"


def id_floor(prefix: str, ms: int) -> str:
    """The smallest id of this kind created at or after `ms` (for time windows over id-ordered rows)."""
    return f"{prefix}{max(ms, 0):012x}"


FILE, JOB, EVENT, CHECKPOINT, KEY, EXPORT = "file-", "ftjob-", "ft-event-", "ftckpt_", "key_", "export-"
COMPLETION, CHAT_COMPLETION = "cmpl-", "chatcmpl-"
ROLLOUT = "ftrollout-"
EVAL, EVAL_RUN, OUTPUT_ITEM = "eval_", "evalrun_", "outputitem_"  # OpenAI's prefixes for evals
