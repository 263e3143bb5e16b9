"""A finished job's result files: OpenAI's step-metrics CSV and our reproducibility manifest, stored as files of
purpose `fine-tune-results` owned by the job's key and listed in the job's `result_files`.

The CSV has one row per logged step (its training metrics and, where one ran at that step, its evaluation's), read
from the job's metrics events, so it spans every attempt of a resumed job. Columns: `step`, then OpenAI's names in
OpenAI's order where the job has them, then every other metric in name order. The manifest is what re-creates the
job (`request`: a create body with every hyperparameter resolved) and what it ran on (see worker/manifest.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import ids
from app.core.config import Settings
from app.db.models import File, Job, JobEvent

RESULTS_PURPOSE = "fine-tune-results"
LEADING_COLUMNS = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
                   "full_valid_loss", "full_valid_mean_token_accuracy", "train_reward_mean", "valid_reward_mean")
NOT_COLUMNS = {"step", "total_steps", "checkpoint"}


def metric_rows(session: Session, job_id: str) -> list[dict[str, Any]]:
    """One dict per logged step, oldest first: the step's metrics events merged (training, then evaluation)."""
    events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
                             .order_by(JobEvent.id))
    rows: dict[int, dict[str, Any]] = {}
    for event in events:
        data = event.data or {}
        if "checkpoint" in data or "step" not in data:
            continue
        rows.setdefault(int(data["step"]), {}).update(data)
    return [{**rows[step], "step": step} for step in sorted(rows)]


def metrics_csv(rows: list[dict[str, Any]]) -> bytes:
    names = {k for row in rows for k, v in row.items() if k not in NOT_COLUMNS and isinstance(v, int | float)}
    columns = ["step", *(c for c in LEADING_COLUMNS if c in names), *sorted(names - set(LEADING_COLUMNS))]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def write_result_files(session: Session, settings: Settings, job: Job, manifest: dict[str, Any]) -> list[File]:
    """The CSV and the manifest written to the files dir and added to the session (uncommitted). The caller deletes
    the returned files' bytes when its transaction fails (`remove_result_files`)."""
    manifest = {"object": "fine_tuning.job.manifest", "job_id": job.id, **manifest}
    contents = ((f"{job.id}-step_metrics.csv", ".csv", metrics_csv(metric_rows(session, job.id))),
                (f"{job.id}-manifest.json", ".json", json.dumps(manifest, indent=2, sort_keys=True).encode()))
    files: list[File] = []
    for filename, suffix, data in contents:
        file_id = ids.new_id(ids.FILE)
        relative = Path("files") / f"{file_id}{suffix}"
        try:
            _write(settings.data_dir / relative, data)
        except OSError:
            remove_result_files(settings, files)
            raise
        files.append(File(id=file_id, owner_id=job.owner_id, filename=filename, purpose=RESULTS_PURPOSE,
                          bytes=len(data), status="processed", path=str(relative),
                          sha256=hashlib.sha256(data).hexdigest()))
    session.add_all(files)
    return files


def remove_result_files(settings: Settings, files: list[File]) -> None:
    for row in files:
        (settings.data_dir / row.path).unlink(missing_ok=True)


def _write(path: Path, data: bytes) -> None:
    """Whole or not at all: a crash mid-write leaves a hidden temporary, never a short file under the real name."""
    tmp = path.with_name(f".{path.name}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk's partial write gives its space back
        raise
