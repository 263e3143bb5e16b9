"""The worker's Celery configuration and command line: the settings long GPU jobs need, the roles, and the thread
split of the embedded mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.core.broker import (
    DEFAULT_QUEUE,
    EXPORT_TASK,
    GPU_QUEUE,
    PRUNE_TASK,
    REAP_TASK,
    RESEND_TASK,
    TRAIN_TASK,
    celery_config,
)
from app.core.config import SettingsError, load_settings
from app.core.threads import embedded_split
from worker.celery_app import worker_config
from worker.main import celery_argv


def test_worker_config_for_long_gpu_jobs(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", max_job_s=7200,
                             reaper_interval_s=30)
    conf = worker_config(settings)
    assert conf["task_acks_late"] is True and conf["worker_prefetch_multiplier"] == 1
    assert conf["task_reject_on_worker_lost"] is False and conf["task_ignore_result"] is True
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert conf["broker_transport_options"]["visibility_timeout"] > settings.max_job_s  # never redelivered mid-job
    assert conf["visibility_timeout"] == conf["broker_transport_options"]["visibility_timeout"]
    assert celery_config(settings)["broker_transport_options"] == conf["broker_transport_options"]  # API agrees
    assert conf["task_routes"][TRAIN_TASK]["queue"] == conf["task_routes"][EXPORT_TASK]["queue"] == GPU_QUEUE
    assert conf["task_routes"][REAP_TASK]["queue"] == conf["task_routes"][RESEND_TASK]["queue"] == DEFAULT_QUEUE
    assert conf["task_create_missing_queues"] is False
    schedule = {entry["task"]: entry for entry in conf["beat_schedule"].values()}
    assert schedule.keys() == {REAP_TASK, RESEND_TASK, PRUNE_TASK}
    for task, entry in schedule.items():
        every = 3600 if task == PRUNE_TASK else 30  # the embedded broker's pruning: hourly
        assert entry["schedule"] == every and entry["options"]["queue"] == DEFAULT_QUEUE
        assert entry["options"]["expires"] == every  # ticks that waited behind a long job are dropped, not replayed
    embedded = worker_config(load_settings(data_dir=tmp_path))
    assert "visibility_timeout" not in embedded["broker_transport_options"]  # SQLAlchemy would refuse it


def test_roles_command_lines() -> None:
    training = celery_argv("training", None, "info", "/d/s")
    assert training[:2] == ["worker", "--queues=gpu"] and "--concurrency=1" in training
    assert "--prefetch-multiplier=1" in training and "--pool=prefork" in training
    assert "--max-tasks-per-child=1" in training and "--beat" not in training
    housekeeping = celery_argv("housekeeping", None, "info", "/d/s")
    assert "--queues=default" in housekeeping and "--pool=solo" in housekeeping
    assert "--beat" in housekeeping and "--schedule=/d/s" in housekeeping
    embedded = celery_argv("all", "me@%h", "debug", "/d/s")
    assert "--queues=gpu,default" in embedded and "--beat" in embedded and "--hostname=me@%h" in embedded
    assert not any(a.startswith("--max-tasks-per-child") for a in embedded)


def test_embedded_thread_split_never_oversubscribes() -> None:
    for cpus in range(1, 65):
        api, worker = embedded_split(cpus)
        assert api >= 1 and worker >= 1 and (api + worker <= cpus or cpus == 1)
    assert embedded_split(2) == (1, 1) and embedded_split(16) == (4, 12)


def test_lease_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="UNSLOTH_HEARTBEAT_S"):
        load_settings(data_dir=tmp_path, lease_s=10, heartbeat_s=10)


def test_the_export_task_is_registered_under_the_name_the_api_sends(tmp_path: Path) -> None:
    """The API sends `export_model` by name and never imports the worker's code; the worker registers that name."""
    from worker.celery_app import make_app

    app = make_app(load_settings(data_dir=tmp_path))
    app.loader.import_default_modules()
    assert {TRAIN_TASK, EXPORT_TASK} <= set(app.tasks)
    assert app.tasks[EXPORT_TASK].acks_late and app.tasks[EXPORT_TASK].Request.__name__ == "ExportRequest"
