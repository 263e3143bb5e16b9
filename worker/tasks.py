"""The Celery tasks: thin. Ids in, the work done by `worker.training`, `worker.exporting`, `worker.evaluating` and
`app.services`, status
in the database. No result is stored (the row is the result), nothing is retried by Celery (a dead attempt is
recovered by the reaper, with an attempt cap, from the database)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.worker.request import Request
from celery.worker.state import task_ready
from sqlalchemy.orm import Session

from app.core.broker import EVAL_TASK, EXPORT_TASK, PRUNE_TASK, REAP_TASK, RESEND_TASK, TRAIN_TASK
from app.services import dispatch, eval_lifecycle, export_lifecycle, lifecycle, storage
from worker import context, evaluating, exporting, training

log = logging.getLogger("worker.tasks")


def lease_owner(nodename: str | None) -> str:
    """`<worker node>/<worker main pid>/<process pid>/<random>`: the prefix names the worker that holds the lease
    (its shutdown hook preempts the jobs under it), the random part tells two attempts in one process apart."""
    return f"{nodename or socket.gethostname()}/{context.main_pid}/{os.getpid()}/{secrets.token_hex(4)}"


@contextlib.contextmanager
def sigterm_preempts() -> Iterator[None]:
    """While a job runs, SIGTERM to this process (systemd and `kill -- -PGID` signal every process of a worker)
    makes the job checkpoint and requeue itself; otherwise the pool's own handler (exit) applies."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: training.preempted.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TrainRequest(Request):
    """A train message as the worker's main process receives it. One that can no longer claim its job (a duplicate,
    a re-send, a stale redelivery) is dropped here, like a revoked task: acknowledged without being handed to a pool
    process, which a training worker replaces after every task (a torch import, seconds, per dropped message).
    The pool process's claim stays the authority: when the database cannot be asked, the message goes on to it."""

    kind = "job"
    _stale: bool | None = None

    @staticmethod
    def claimable(session: Session, object_id: str, attempt: int) -> bool:
        return lifecycle.claimable(session=session, job_id=object_id, attempt=attempt)

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if self._stale is None:
            self._stale = self._stale_delivery(*self.args[:2]) if len(self.args) >= 2 else False
        if self._stale:
            task_ready(self)
            self.acknowledge()
            return True
        return False

    def _stale_delivery(self, object_id: str, attempt: int) -> bool:
        try:
            with context.current().sessions() as session:
                stale = not self.claimable(session, object_id, int(attempt))
        except Exception as e:  # the database is down: let the pool process try (and the re-sender cover a failure)
            log.warning("%s %s attempt %s: cannot check the message is current (%s)", self.kind, object_id, attempt,
                        type(e).__name__)
            return False
        if stale:
            log.info("%s %s attempt %s: not queued with this attempt (a duplicate or stale message); dropped",
                     self.kind, object_id, attempt)
        return stale


class ExportRequest(TrainRequest):
    """An export message, dropped in the main process the same way when it can no longer claim its export."""

    kind = "export"

    @staticmethod
    def claimable(session: Session, object_id: str, attempt: int) -> bool:
        return export_lifecycle.claimable(session=session, export_id=object_id, attempt=attempt)


@shared_task(name=TRAIN_TASK, bind=True, ignore_result=True, acks_late=True, Request=TrainRequest)
def train(self: Task, job_id: str, attempt: int) -> str:
    if training.stopping.is_set():  # this worker is shutting down: give the message back for another one
        raise Reject("the worker is shutting down", requeue=True)
    ctx = context.current()
    with sigterm_preempts():
        outcome = training.run_job(ctx, job_id, int(attempt), lease_owner(self.request.hostname))
    log.info("job %s attempt %s: %s", job_id, attempt, outcome)
    return outcome


class EvalRequest(TrainRequest):
    """An eval run message, dropped in the main process the same way when it can no longer claim its run."""

    kind = "eval run"

    @staticmethod
    def claimable(session: Session, object_id: str, attempt: int) -> bool:
        return eval_lifecycle.claimable(session=session, run_id=object_id, attempt=attempt)


@shared_task(name=EXPORT_TASK, bind=True, ignore_result=True, acks_late=True, Request=ExportRequest)
def export_model(self: Task, export_id: str, attempt: int) -> str:
    if training.stopping.is_set():  # this worker is shutting down: give the message back for another one
        raise Reject("the worker is shutting down", requeue=True)
    outcome = exporting.run_export(context.current(), export_id, int(attempt), lease_owner(self.request.hostname))
    log.info("export %s attempt %s: %s", export_id, attempt, outcome)
    return outcome


@shared_task(name=EVAL_TASK, bind=True, ignore_result=True, acks_late=True, Request=EvalRequest)
def run_eval(self: Task, run_id: str, attempt: int) -> str:
    if training.stopping.is_set():  # this worker is shutting down: give the message back for another one
        raise Reject("the worker is shutting down", requeue=True)
    outcome = evaluating.run_eval(context.current(), run_id, int(attempt), lease_owner(self.request.hostname))
    log.info("eval run %s attempt %s: %s", run_id, attempt, outcome)
    return outcome


@shared_task(name=REAP_TASK, ignore_result=True)
def reap_expired_leases() -> int:
    """Requeue (or fail, past the cap) the jobs, exports and eval runs whose worker stopped renewing its lease, and
    send them again."""
    ctx = context.current()
    with ctx.sessions() as session:
        requeued = lifecycle.reap_expired(session=session, settings=ctx.settings)
        for job_id, attempt in requeued:
            dispatch.send_train(session=session, broker=ctx.broker, job_id=job_id, attempt=attempt)
        return len(requeued) + reap_exports(session, ctx) + reap_eval_runs(session, ctx)


def reap_exports(session: Session, ctx: context.WorkerContext) -> int:
    requeued, ended = export_lifecycle.reap_expired(session=session, settings=ctx.settings)
    for export_id, attempt in requeued:
        dispatch.send_export(session=session, broker=ctx.broker, export_id=export_id, attempt=attempt)
    for export_id in ended:  # failed or cancelled with a dead worker's files left: never recorded, never served
        storage.remove_export_dir(ctx.settings, export_id)
    return len(requeued) + len(ended)


def reap_eval_runs(session: Session, ctx: context.WorkerContext) -> int:
    requeued = eval_lifecycle.reap_expired(session=session, settings=ctx.settings)
    for run_id, attempt in requeued:
        dispatch.send_eval(session=session, broker=ctx.broker, run_id=run_id, attempt=attempt)
    return len(requeued)


@shared_task(name=PRUNE_TASK, ignore_result=True)
def prune_broker() -> int:
    """Delete the embedded broker's delivered messages older than a day (kombu's SQLAlchemy transport keeps them
    for ever, so its database grew with every job and tick)."""
    return context.current().broker.prune(timedelta(days=1))


@shared_task(name=RESEND_TASK, ignore_result=True)
def resend_unclaimed() -> int:
    """Send the message again for queued jobs, exports and eval runs nobody claimed in time (the first one was
    lost)."""
    ctx = context.current()
    with ctx.sessions() as session:
        return (len(dispatch.resend_unclaimed(session=session, broker=ctx.broker))
                + len(dispatch.resend_unclaimed_exports(session=session, broker=ctx.broker))
                + len(dispatch.resend_unclaimed_evals(session=session, broker=ctx.broker)))
