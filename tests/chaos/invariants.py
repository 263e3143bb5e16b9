"""What must hold for every job, whatever was killed, frozen or restarted: checked on the jobs database after every
chaos test, and watched while it runs.

- At most one live lease per job: a lease only on a running job, and no second `running` transition before the run
  it follows ended (was requeued, paused or finished).
- Terminal states are never left: once `succeeded`, `failed` or `cancelled`, no other transition and no lease.
- Attempts only grow: every transition's attempt is at least the one before (a new run: strictly above), the row's
  attempt is at least the last one recorded, and the watcher never saw a job's attempt go down.
- Exactly one terminal transition per terminal job (status events, `data.status`), none for the others.
- Every recorded checkpoint, and every fine-tuned model, is complete on disk (its manifest lists files all present).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from unsloth_core.checkpoint import is_complete

TERMINAL = ("succeeded", "failed", "cancelled")
LEASED = ("running",)


def _rows(url: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return list(conn.execute(query).fetchall())


def violations(url: str, data_dir: Path) -> list[str]:
    """Every broken invariant, one line each (empty: all hold)."""
    problems: list[str] = []
    jobs = _rows(url, "SELECT id, status, attempt, lease_owner, lease_expires_at, finished_at FROM jobs ORDER BY id")
    events: dict[str, list[tuple[str, int | None]]] = {}
    for job_id, data in _rows(url, "SELECT job_id, data FROM job_events ORDER BY id"):
        if isinstance(data, dict) and "status" in data:
            events.setdefault(job_id, []).append((data["status"], data.get("attempt")))
    for job_id, status, attempt, owner, expires, finished in jobs:
        transitions = events.get(job_id, [])
        statuses = [s for s, _ in transitions]
        where = f"job {job_id} ({status}, attempt {attempt}, transitions {transitions})"
        if (owner is not None or expires is not None) and status not in LEASED:
            problems.append(f"{where}: a lease ({owner}) on a job that is not running")
        if status in LEASED and owner is None:
            problems.append(f"{where}: running without a lease")
        terminal = [s for s in statuses if s in TERMINAL]
        if status in TERMINAL:
            if terminal != [status]:
                problems.append(f"{where}: {len(terminal)} terminal transitions, expected exactly one ({status})")
            if statuses and statuses[-1] != status:
                problems.append(f"{where}: a transition after the terminal one")
            if finished is None:
                problems.append(f"{where}: terminal without finished_at")
        elif terminal:
            problems.append(f"{where}: left the terminal state {terminal[0]}")
        if statuses and statuses[-1] != status:
            problems.append(f"{where}: the last transition is not the job's status")
        for before, after in itertools.pairwise(statuses):
            if before == "running" and after == "running":
                problems.append(f"{where}: a second run started before the first ended (two live leases)")
        seen = [a for _, a in transitions if a is not None]
        if any(b < a for a, b in itertools.pairwise(seen)):
            problems.append(f"{where}: the attempt went down between transitions")
        runs = [a for s, a in transitions if s == "running" and a is not None]
        if any(b <= a for a, b in itertools.pairwise(runs)):
            problems.append(f"{where}: two runs with the same attempt (a stale delivery claimed the job)")
        if seen and attempt < seen[-1]:
            problems.append(f"{where}: the row's attempt is below the last transition's")
    for job_id, step, path in _rows(url, "SELECT job_id, step_number, path FROM checkpoints"):
        if not is_complete(data_dir / path):
            problems.append(f"job {job_id}: checkpoint at step {step} ({path}) is recorded but not complete")
    for model_id, path in _rows(url, "SELECT id, path FROM models WHERE kind = 'fine_tune'"):
        if not is_complete(data_dir / path):
            problems.append(f"model {model_id} ({path}) is recorded but not complete")
    return problems


@dataclass
class Watcher:
    """Samples every job's (status, attempt) while a test runs: an attempt that goes down, or a terminal status that
    is left, even for a moment, is a violation. Database outages (the tests cause them) are skipped over."""

    url: str
    interval: float = 0.1
    problems: list[str] = field(default_factory=list)
    _last: dict[str, tuple[str, int]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._run, name="invariant-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return self.problems

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.wait(self.interval):
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.url, connect_timeout=1, autocommit=True)
                rows = conn.execute("SELECT id, status, attempt FROM jobs").fetchall()
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
                continue
            for job_id, status, attempt in rows:
                before = self._last.get(job_id)
                if before is not None:
                    if attempt < before[1]:
                        self.problems.append(f"job {job_id}: attempt went from {before[1]} down to {attempt}")
                    if before[0] in TERMINAL and status != before[0]:
                        self.problems.append(f"job {job_id}: left {before[0]} for {status}")
                self._last[job_id] = (status, attempt)
        if conn is not None:
            conn.close()
