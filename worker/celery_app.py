"""The worker's Celery app, on the API's configuration (`celery_config`: the same broker, queues and routes) plus
what long GPU jobs need:

- `gpu` queue for training, `default` for housekeeping; one task at a time per process, acknowledged after it ends
  (`acks_late`, prefetch 1); a killed process's message is acknowledged, not requeued (`reject_on_worker_lost` off):
  the database lease and the reaper decide retries, with a cap, so an OOM-killed job cannot loop.
- The broker's visibility timeout is above the longest job, so Redis never hands a running job to a second worker.
- No results are stored: the job row is the state.
- Beat sends the reaper and the re-sender of unclaimed jobs to the `default` queue every `reaper_interval_s`.
- Shutdown (SIGTERM, Ctrl-C): the jobs this worker holds are asked to checkpoint and requeue themselves; the worker
  exits when they have, or after `shutdown_grace_s` whatever happens (their leases then expire and the reaper
  requeues them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any

import billiard
from celery import Celery, signals

from app.core.broker import DEFAULT_QUEUE, PRUNE_TASK, REAP_TASK, RESEND_TASK, celery_config
from app.core.config import Settings, load_settings
from app.services import lifecycle, storage
from worker import context

log = logging.getLogger("worker")

_settings: Settings | None = None  # the settings of the worker app built in this process
_warm = False  # preload the engine in each new pool process (training workers)
_shutting_down = threading.Event()
SHUTDOWN_NOTICE = signal.SIGURG  # main -> pool processes: the worker is stopping (ignored by default, unused)


def worker_config(settings: Settings) -> dict[str, Any]:
    config = celery_config(settings)
    every = settings.reaper_interval_s
    housekeeping = {"queue": DEFAULT_QUEUE, "routing_key": DEFAULT_QUEUE, "expires": every}  # stale ticks dropped
    config.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=False,
        task_acks_on_failure_or_timeout=True,
        task_time_limit=int(settings.max_job_s + 900),  # a backstop only: jobs stop themselves at max_job_s
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        visibility_timeout=settings.visibility_timeout_s,
        # A broker blip must not kill hours of training; a redelivered duplicate cannot claim the job anyway.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_proc_alive_timeout=120.0,  # a new pool process loads torch and the engine before it is ready
        worker_send_task_events=False,
        worker_hijack_root_logger=True,
        beat_schedule={
            "reap-expired-leases": {"task": REAP_TASK, "schedule": every, "options": housekeeping},
            "resend-unclaimed": {"task": RESEND_TASK, "schedule": every, "options": housekeeping},
            "prune-broker": {"task": PRUNE_TASK, "schedule": 3600.0, "options": {**housekeeping, "expires": 3600}},
        },
        beat_schedule_filename=str(storage.beat_schedule(settings)),
    )
    return config


def make_app(settings: Settings, *, warm: bool = False) -> Celery:
    """The worker app. `warm`: each new pool process imports torch and the engine before taking a job."""
    global _settings, _warm
    _settings, _warm = settings, warm
    context.main_pid = os.getpid()
    app = Celery("unsloth-worker", include=["worker.tasks"])
    app.conf.update(worker_config(settings))
    return app


def __getattr__(name: str) -> Any:
    """`celery -A worker.celery_app ...` (health checks, inspection): the app from the environment's settings."""
    if name == "app":
        global _lazy_app
        if _lazy_app is None:
            _lazy_app = make_app(load_settings())
        return _lazy_app
    raise AttributeError(name)


_lazy_app: Celery | None = None


# ---- pool processes ----


@signals.worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """In a fresh pool process: size torch's threads and load the engine now, while the worker is idle, rather
    than when a job arrives."""
    if not _warm or _settings is None:
        return
    from worker import training

    # billiard resets the terminating signals after this initializer; SIGURG is not one of them.
    signal.signal(SHUTDOWN_NOTICE, lambda *_: training.stopping.set())
    if _shutting_down.is_set():  # forked to replace a process during shutdown: it will take no job
        training.stopping.set()
        return
    from app.core.threads import apply_torch_threads

    apply_torch_threads(_settings.torch_threads)
    started = time.monotonic()
    import torch
    import torch._dynamo  # the model's first construction loads it otherwise: seconds

    import unsloth_core.finetune  # noqa: F401

    if _settings.torch_threads:
        torch.set_num_threads(_settings.torch_threads)
    log.info("pool process %d ready in %.1f s", os.getpid(), time.monotonic() - started)


# ---- shutdown ----


@signals.worker_shutting_down.connect
def _on_shutdown(sender: str, **_: Any) -> None:
    """Runs in the main process, inside the signal handler: start threads, do nothing slow here."""
    if _settings is None or _shutting_down.is_set():
        return
    _shutting_down.set()
    for child in billiard.active_children():  # a running job stops at its next step; no new one is claimed
        if child.name.startswith("ForkPoolWorker") and child.pid:
            with contextlib.suppress(OSError):
                os.kill(child.pid, SHUTDOWN_NOTICE)
    prefix = f"{sender}/{os.getpid()}/"
    threading.Thread(target=_preempt_until_exit, args=(prefix,), name="preempt", daemon=True).start()
    threading.Thread(target=_exit_after_grace, args=(_settings.shutdown_grace_s,), name="grace",
                     daemon=True).start()


def _preempt_until_exit(owner_prefix: str) -> None:
    """Ask this worker's jobs to checkpoint and requeue; keep asking, for a job claimed just as the shutdown
    began."""
    ctx = context.current()
    failing = False
    while True:
        try:
            with ctx.sessions() as session:
                n = lifecycle.preempt_jobs(session=session, owner_prefix=owner_prefix)
            if n:
                log.warning("shutting down: asked %d running job(s) to checkpoint and requeue", n)
            failing = False
        except Exception as e:
            if not failing:
                log.warning("shutting down: cannot reach the database to preempt jobs (%s)", type(e).__name__)
            failing = True
        time.sleep(0.5)


def _exit_after_grace(grace: float) -> None:
    time.sleep(grace)
    log.error("shutdown grace (%.0f s) is over: exiting now; the leases of unfinished jobs will expire and the "
              "reaper will requeue them", grace)
    for child in billiard.active_children():  # pool processes die with us; beat would not
        with contextlib.suppress(OSError):
            os.kill(child.pid, signal.SIGKILL)
    os._exit(1)
