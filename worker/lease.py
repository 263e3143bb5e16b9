"""A worker's hold on one attempt of a job. A heartbeat thread renews it on its own database session and notes the
job's stop request; the training loop checks it between steps. Once lost (the reaper requeued the job, or the
database could not be reached until the lease ran out), every later write is refused: the worker stops and writes
nothing, because another worker may already own the job."""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import TypedDict

from sqlalchemy.exc import SQLAlchemyError

from app.services import lifecycle
from app.services.lifecycle import LeaseLost
from worker.context import WorkerContext

log = logging.getLogger("worker.lease")


class Fence(TypedDict):
    """The keyword arguments every fenced write in `lifecycle` takes."""

    job_id: str
    attempt: int
    owner: str


class Lease:
    def __init__(self, ctx: WorkerContext, job_id: str, attempt: int, owner: str) -> None:
        self.ctx, self.job_id, self.attempt, self.owner = ctx, job_id, attempt, owner
        self.lost = threading.Event()
        self.released = threading.Event()  # the attempt is ending: its final write clears the lease itself
        self.stop_requested: str | None = None
        self.expires = time.monotonic() + ctx.settings.lease_s  # our own clock's view of the lease

    @property
    def fence(self) -> Fence:
        return Fence(job_id=self.job_id, attempt=self.attempt, owner=self.owner)

    def ensure(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(self.job_id)

    def renew(self) -> None:
        """Extend the lease (heartbeat thread). Raises LeaseLost."""
        started = time.monotonic()
        with self.ctx.sessions() as session:
            self.stop_requested = lifecycle.renew_lease(session=session, lease=self.ctx.lease,
                                                        job_id=self.job_id, attempt=self.attempt, owner=self.owner)
        self.expires = started + self.ctx.settings.lease_s

    def check(self) -> str | None:
        """The job's stop request, read now (between training steps). Raises LeaseLost."""
        self.ensure()
        try:
            with self.ctx.sessions() as session:
                self.stop_requested = lifecycle.read_stop_request(session=session, job_id=self.job_id,
                                                                  attempt=self.attempt, owner=self.owner)
        except LeaseLost:
            self.lost.set()
            raise
        except SQLAlchemyError as e:  # the heartbeat decides when an outage has cost us the lease
            log.warning("job %s: cannot read its stop request (%s); going on", self.job_id, type(e).__name__)
        return self.stop_requested


class Heartbeat:
    """Renews `lease` every `interval` seconds in a daemon thread while the `with` block runs."""

    def __init__(self, lease: Lease, interval: float) -> None:
        self.lease, self.interval = lease, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and not self.lease.released.is_set():
            try:
                self.lease.renew()
            except LeaseLost:
                if self.lease.released.is_set():  # finished meanwhile: the final write cleared the lease
                    return
                log.warning("job %s attempt %d: lease lost; stopping without writing", self.lease.job_id,
                            self.lease.attempt)
                self.lease.lost.set()
                return
            except SQLAlchemyError as e:
                log.warning("job %s: lease renewal failed (%s)", self.lease.job_id, type(e).__name__)
                if time.monotonic() >= self.lease.expires:  # the reaper may have requeued it by now: fence ourselves
                    log.error("job %s: the lease ran out while the database was unreachable; stopping",
                              self.lease.job_id)
                    self.lease.lost.set()
                    return
