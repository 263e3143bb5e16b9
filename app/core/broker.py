"""A lightweight Celery app for *sending* tasks by name: the API never imports the worker's (torch-heavy) task code.
The worker builds its own app on the same configuration (`celery_config`), so routes and queues agree."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from kombu import Exchange, Queue
from sqlalchemy import create_engine, inspect, text

from app.core.config import Settings

TRAIN_TASK = "worker.tasks.train"
EXPORT_TASK = "worker.tasks.export_model"
EVAL_TASK = "worker.tasks.run_eval"
REAP_TASK = "worker.tasks.reap_expired_leases"
RESEND_TASK = "worker.tasks.resend_unclaimed"
PRUNE_TASK = "worker.tasks.prune_broker"
GPU_QUEUE, DEFAULT_QUEUE = "gpu", "default"


def celery_config(settings: Settings) -> dict[str, Any]:
    options = dict(settings.broker_transport_options)
    if settings.broker_url.startswith(("redis", "rediss")):
        # Redis redelivers an unacknowledged message after this; every client of the broker must agree (the
        # shortest value wins), and it must exceed the longest job or a running job goes to a second worker.
        # (The SQLAlchemy transport hands its options to create_engine: only Redis gets this one.)
        options.setdefault("visibility_timeout", settings.visibility_timeout_s)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "task_queues": [Queue(GPU_QUEUE, Exchange(GPU_QUEUE), routing_key=GPU_QUEUE),
                        Queue(DEFAULT_QUEUE, Exchange(DEFAULT_QUEUE), routing_key=DEFAULT_QUEUE)],
        "task_default_queue": DEFAULT_QUEUE,
        "task_create_missing_queues": False,
        "task_routes": {TRAIN_TASK: {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE},
                        EXPORT_TASK: {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE},
                        EVAL_TASK: {"queue": GPU_QUEUE, "routing_key": GPU_QUEUE},
                        REAP_TASK: {"queue": DEFAULT_QUEUE, "routing_key": DEFAULT_QUEUE},
                        RESEND_TASK: {"queue": DEFAULT_QUEUE, "routing_key": DEFAULT_QUEUE},
                        PRUNE_TASK: {"queue": DEFAULT_QUEUE, "routing_key": DEFAULT_QUEUE}},
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def make_celery(settings: Settings, name: str = "unsloth-api") -> Celery:
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class Broker:
    """Sends train, export and eval messages; checks the broker is reachable; counts the messages waiting in a queue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # the re-send back-off is read from here when a message goes out
        self.celery = make_celery(settings)

    def send_train(self, job_id: str, attempt: int) -> None:
        self.celery.send_task(TRAIN_TASK, args=[job_id, attempt], queue=GPU_QUEUE, routing_key=GPU_QUEUE,
                              retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})

    def send_export(self, export_id: str, attempt: int) -> None:
        """Merging and quantizing are heavy: a worker on the gpu queue does them, never the API."""
        self.celery.send_task(EXPORT_TASK, args=[export_id, attempt], queue=GPU_QUEUE, routing_key=GPU_QUEUE,
                              retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})

    def send_eval(self, run_id: str, attempt: int) -> None:
        """An eval run generates with a model and may load a judge: a worker on the gpu queue runs it."""
        self.celery.send_task(EVAL_TASK, args=[run_id, attempt], queue=GPU_QUEUE, routing_key=GPU_QUEUE,
                              retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5})

    def ping(self, timeout: float = 3.0) -> None:
        """Raises when the broker cannot be reached within `timeout` seconds."""
        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
            conn.default_channel  # noqa: B018 (opening a channel proves the transport works, e.g. the SQLite tables)

    def queue_depth(self, queue: str = GPU_QUEUE) -> int:
        with self.celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=3.0)
            declared = conn.default_channel.queue_declare(queue=queue, passive=False, durable=True,
                                                          auto_delete=False)
            return int(declared.message_count)

    def prune(self, older_than: timedelta) -> int:
        """The embedded (SQLAlchemy) transport keeps every delivered message, marked invisible, for ever: delete
        those delivered more than `older_than` ago. Returns how many; 0 for Redis, which deletes on delivery."""
        if not self.settings.broker_url.startswith("sqla+"):
            return 0
        engine = create_engine(self.settings.broker_url.removeprefix("sqla+"))
        cutoff = datetime.now() - older_than
        try:
            with engine.begin() as conn:
                if not inspect(conn).has_table("kombu_message"):
                    return 0
                result = conn.execute(text("DELETE FROM kombu_message WHERE visible = :hidden AND timestamp < :cutoff"),
                                      {"hidden": False, "cutoff": cutoff})
                return int(result.rowcount)
        finally:
            engine.dispose()

    def close(self) -> None:
        self.celery.close()
