"""The data dir's layout, and the one place that checks a path stays inside it.

```
<data dir>/files/<file id>.jsonl                      uploads (and `.upload-<id>.part` while one arrives)
<data dir>/models/<name> or <org>/<name>             base models, Hugging Face directories (the operator's;
                                                      `.pull-<name>` while one downloads)
<data dir>/jobs/<job id>/attempt-<n>/                 what one attempt of a job writes:
    checkpoints/step-<N>/  final/  tokenizer/
<data dir>/exports/<export id>/attempt-<n>/           what one attempt of an export writes: gguf/ (the engine's
    atomic directory: model.<TYPE>.gguf, Modelfile, verification.json), or <name>.tar (a merged or PEFT directory)
<data dir>/celerybeat-schedule                        the housekeeping worker's beat schedule
```

Rows store paths relative to the data dir. Every path read back from a row, or built from an id, is resolved and
checked to lie in its own subdirectory: a symbolic link planted there that leads out is treated as missing (never
read, served, written or deleted through).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from pathlib import Path

from app.core import ids
from app.core.config import Settings

log = logging.getLogger("app.storage")

NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
BASE_ID = re.compile(rf"{NAME}(?:/{NAME})?")  # always `fullmatch`: `$` would also accept a trailing newline


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


# ---- files ----


def staging_path(settings: Settings) -> Path:
    """Where an upload streams to before it has a row: hidden, server-named, in the files dir (same filesystem)."""
    return settings.files_dir / f".upload-{ids.new_id('')}.part"


def file_relative(file_id: str) -> Path:
    """A stored file's path, relative to the data dir: named by its id, never by the client's file name."""
    return Path("files") / f"{file_id}.jsonl"


def file_content(settings: Settings, relative: str) -> Path:
    """Where a file row's bytes are, resolved: an upload in the files dir, or an export's artifact in the exports
    dir. A path that resolves outside both (a symlink planted there) raises FileNotFoundError, as if the bytes were
    gone."""
    path = (settings.data_dir / relative).resolve()
    if not (_inside(path, settings.files_dir) or _inside(path, settings.exports_dir)):
        log.error("the content path %s leads outside the files and exports dirs; refusing it", path)
        raise FileNotFoundError(errno.ENOENT, "file content outside the files and exports dirs", str(path))
    return path


def remove_file_entry(settings: Settings, relative: str) -> None:
    """Delete a stored file's directory entry: the entry itself, so a planted symlink goes, never its target."""
    entry = settings.data_dir / relative
    if entry.parent == settings.files_dir or (entry.parent.is_dir() and _inside(entry.parent, settings.exports_dir)):
        entry.unlink(missing_ok=True)


# ---- base models ----


def base_model_dir(settings: Settings, model_id: str) -> Path | None:
    """`<models dir>/<id>` for a base model id: one or two plain name segments (no `..`, no absolute path, no control
    character), so an id never names anything but an entry of the models dir. The entries themselves are the
    operator's: one may be a symbolic link to a model kept elsewhere."""
    if not BASE_ID.fullmatch(model_id):
        return None
    path = settings.models_dir / model_id
    return path if (path / "config.json").is_file() else None


def base_model_relative(settings: Settings, path: Path) -> str:
    """A base model directory found in the models dir, as its row records it (not resolved: it may be a link)."""
    return str(path.relative_to(settings.data_dir))


def install_dir(settings: Settings, name: str) -> Path:
    """Where a base model named `name` is installed. Raises ValueError for a name that is not a model id, or whose
    `<org>` directory is a link out of the models dir."""
    if not BASE_ID.fullmatch(name):
        raise ValueError(f"{name!r} is not a usable model name (letters, digits, '.', '_', '-'; at most one '/')")
    target = settings.models_dir / name
    if not _inside(target.parent, settings.models_dir):
        raise ValueError(f"{target.parent} leads outside the models directory {settings.models_dir}; install the "
                         "model under another name")
    return target


def pull_staging_dir(settings: Settings, name: str) -> Path:
    """Where a download from the Hugging Face Hub lands before it is checked and copied (`name` already sanitized):
    hidden, so a scan of the models dir never lists it."""
    return settings.models_dir / f".pull-{name}"


def beat_schedule(settings: Settings) -> Path:
    return settings.data_dir / "celerybeat-schedule"


# ---- jobs ----


def job_dir(settings: Settings, job_id: str) -> Path:
    """`<data dir>/jobs/<job id>`. Raises PermissionError when it leads out of the jobs dir (a symlink planted
    there): nothing is written, resumed or served outside the data dir."""
    return _inside_jobs_dir(settings, settings.jobs_dir / job_id)


def attempt_dir(settings: Settings, job_id: str, attempt: int) -> Path:
    """Where one attempt writes (checkpoints, final adapter): a worker whose lease was taken over can never touch
    the files of the attempt that replaced it. Raises PermissionError as `job_dir` does."""
    return _inside_jobs_dir(settings, job_dir(settings, job_id) / f"attempt-{attempt}")


def _inside_jobs_dir(settings: Settings, path: Path) -> Path:
    return _inside_dir(settings.jobs_dir, path)


def _inside_dir(root: Path, path: Path) -> Path:
    if (path.is_symlink() or path.exists()) and not _inside(path, root):
        raise PermissionError(errno.EACCES, f"the directory leads outside the data dir's {root.name} directory",
                              str(path))
    return path


def artifact_relative(settings: Settings, path: Path) -> str:
    """A worker's output directory (checkpoint, final adapter), as its row records it. Raises ValueError for one
    outside the jobs dir."""
    path = path.resolve()
    if not _inside(path, settings.jobs_dir):
        raise ValueError(f"{path} is not inside the jobs dir {settings.jobs_dir}")
    return str(path.relative_to(settings.data_dir.resolve()))


def job_artifact(settings: Settings, job_id: str, relative: str) -> Path | None:
    """A recorded checkpoint of the job, resolved; None when it leads out of the job's own directory."""
    path = (settings.data_dir / relative).resolve()
    return path if _inside(path, job_dir(settings, job_id)) else None


def adapter_dir(settings: Settings, relative: str) -> Path | None:
    """A fine-tune's or checkpoint's adapter directory, resolved; None unless it and every file in it lie inside
    the jobs dir (a symlink planted there that leads out is refused: nothing outside the data dir is read)."""
    jobs = settings.jobs_dir.resolve()
    path = (settings.data_dir / relative).resolve()
    if not path.is_relative_to(jobs) or not path.is_dir():
        return None
    for root, dirs, files in os.walk(path):  # links are not followed: each is checked where it leads
        for name in dirs + files:
            entry = Path(root) / name
            if not entry.resolve().is_relative_to(jobs):
                log.error("adapter %s: %s leads outside the jobs dir; refusing to serve it", path, entry)
                return None
    return path


def remove_artifact(settings: Settings, relative: str) -> None:
    """Delete a recorded output directory, only ever inside the jobs dir."""
    path = (settings.data_dir / relative).resolve()
    if _inside(path, settings.jobs_dir) and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


# ---- exports ----


def export_dir(settings: Settings, export_id: str) -> Path:
    """`<data dir>/exports/<export id>`. Raises PermissionError when it leads out of the exports dir (a symlink
    planted there)."""
    return _inside_dir(settings.exports_dir, settings.exports_dir / export_id)


def export_attempt_dir(settings: Settings, export_id: str, attempt: int) -> Path:
    """Where one attempt of an export writes: a worker whose lease was taken over never touches the files of the
    attempt that replaced it. Raises PermissionError as `export_dir` does."""
    return _inside_dir(settings.exports_dir, export_dir(settings, export_id) / f"attempt-{attempt}")


def export_relative(settings: Settings, path: Path) -> str:
    """An export's artifact, as its file row records it. Raises ValueError for one outside the exports dir."""
    path = path.resolve()
    if not _inside(path, settings.exports_dir):
        raise ValueError(f"{path} is not inside the exports dir {settings.exports_dir}")
    return str(path.relative_to(settings.data_dir.resolve()))


def remove_export_dir(settings: Settings, export_id: str) -> None:
    """Delete what an export wrote (every attempt's directory), only ever inside the exports dir."""
    try:
        root = export_dir(settings, export_id)
    except PermissionError:
        log.error("export %s: its directory leads outside the exports dir; not deleting through it", export_id)
        return
    shutil.rmtree(root, ignore_errors=True)
