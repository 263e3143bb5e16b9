"""One attempt of an export, from claim to its end: the body of the `export_model` task.

claim (conditional UPDATE; zero rows: a duplicate or stale message, dropped) -> heartbeat the lease -> delete what
earlier attempts wrote -> load the base (and the adapter) in fp32 on the CPU -> the export into
`exports/<id>/attempt-<n>/`, read back and compared before it counts:
- gguf: the engine's `save_gguf` (an atomic directory with the file, the Modelfile and verification.json; the check
  is the engine's: exact for f32/f16/bf16, a top-1 bound for the quantized types);
- merged: the adapter folded in (the engine's fp32 merge), saved in the asked dtype, loaded back and compared with
  the merged model rounded to that dtype (exact), and the merge itself with the adapter;
- peft: the adapter's files as trained, loaded back onto the base and compared with the adapter (exact);
  a merged or PEFT directory is packed as one .tar, so a download is one file;
-> one fenced transaction records the artifacts as files (purpose `export`) and the export succeeded.

Nothing half-written is ever served: a file is recorded only in the transaction that marks its export succeeded, and
any other end (the check failed, a full disk, the model deleted meanwhile, a cancel, a lost lease) deletes the
attempt's directory. A cancel stops the engine's call itself: the engine asks `ExportLease.should_stop` between
tensors and probes, which reads the export's cancel flag at most once a second. A worker that dies mid-export stops
renewing its lease; the reaper requeues the export (attempt + 1, capped by `max_job_restarts`) and the next attempt
starts by deleting the dead one's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from app.db.models import Export, ExportStatus, Model
from app.services import export_lifecycle, storage
from app.services.export_lifecycle import Artifact
from app.services.lifecycle import LeaseLost
from worker import failures
from worker.context import WorkerContext
from worker.lease import Heartbeat, Lease
from worker.training import _final_write

if TYPE_CHECKING:
    from unsloth_core.export_cancel import StopCheck
    from unsloth_core.model import Llama
    from unsloth_core.tokenizer import Tokenizer

log = logging.getLogger("worker.exporting")

MERGED_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
CANCEL_POLL_S = 1.0  # how often, at most, the engine's cancel check reads the database


@dataclass
class ExportFailure(Exception):
    code: str
    message: str
    param: str | None = None
    verification: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class Source:
    """What is exported: a base model directory, and the adapter applied on top (None: the base model itself)."""

    base: Path
    adapter: Path | None


class ExportLease(Lease):
    """The job lease's heartbeat, renewing an export row instead; it notes a cancel asked for meanwhile, and
    `should_stop` reads it for the engine between its units of work."""

    cancel_requested = False
    polled = float("-inf")  # when should_stop last read the cancel flag (time.monotonic)

    def renew(self) -> None:
        started = time.monotonic()
        with self.ctx.sessions() as session:
            self.cancel_requested = export_lifecycle.renew_lease(session=session, export_id=self.job_id,
                                                                 attempt=self.attempt, owner=self.owner,
                                                                 lease=self.ctx.lease)
        self.expires = started + self.ctx.settings.lease_s

    def check(self) -> str | None:
        """The export's stop request as the heartbeat or `should_stop` last read it."""
        self.ensure()
        return "cancel" if self.cancel_requested else None

    def should_stop(self) -> bool:
        """The engine's `should_stop` (unsloth_core/export_cancel.py): whether the user cancelled the export. The
        engine asks between tensors and probes, hundreds of times an export, so the flag is read from the database
        at most once per CANCEL_POLL_S; a lost lease stops the export at once (LeaseLost)."""
        self.ensure()
        now = time.monotonic()
        if self.cancel_requested or now - self.polled < CANCEL_POLL_S:
            return self.cancel_requested
        self.polled = now
        try:
            with self.ctx.sessions() as session:
                self.cancel_requested = export_lifecycle.cancel_requested(session=session, export_id=self.job_id)
        except SQLAlchemyError as e:  # the heartbeat decides when an outage has cost us the lease
            log.warning("export %s: cannot read its cancel flag (%s); going on", self.job_id, type(e).__name__)
        return self.cancel_requested


def run_export(ctx: WorkerContext, export_id: str, attempt: int, owner: str) -> str:
    """Run one attempt; returns how it ended: dropped, lost, succeeded, failed, cancelled or unrecorded (the
    database's disk is full)."""
    with ctx.sessions() as session:
        row = export_lifecycle.claim_export(session=session, export_id=export_id, attempt=attempt, owner=owner,
                                            lease=ctx.lease)
    if row is None:
        log.info("export %s attempt %d: not queued with this attempt (a duplicate or stale message); dropped",
                 export_id, attempt)
        return "dropped"
    lease = ExportLease(ctx, export_id, attempt, owner)
    try:
        with Heartbeat(lease, ctx.settings.heartbeat_s):
            return _run_claimed(ctx, row, lease)
    except LeaseLost:
        _discard(ctx, export_id, attempt)
        log.warning("export %s attempt %d: lease lost; stopped, its files deleted", export_id, attempt)
        return "lost"
    except OperationalError as e:
        _discard(ctx, export_id, attempt)
        if not failures.is_storage_full(e):
            raise
        log.error("export %s attempt %d: the database's disk is full, so the export's end could not be recorded; "
                  "it stays running until its lease expires, then the reaper requeues it", export_id, attempt)
        return "unrecorded"
    finally:
        _release_memory()


def _run_claimed(ctx: WorkerContext, row: Export, lease: ExportLease) -> str:
    settings = ctx.settings
    try:
        storage.remove_export_dir(settings, row.id)  # earlier attempts' files: never recorded, never to be served
        out = storage.export_attempt_dir(settings, row.id, row.attempt)
        out.mkdir(parents=True, exist_ok=True)
        source = _source(ctx, row)
        artifacts, verification = export_artifacts(ctx, row, source, out, lease.should_stop)
    except LeaseLost:
        raise
    except Exception as e:
        _discard(ctx, row.id, row.attempt)  # before the failure's write: a full disk gets its space back
        failure = classify(e)
        if failure.code in ("storage_error", "model_unreadable"):  # its files may have gone while being read
            failure = _gone(ctx, row) or failure
        if failure.code in ("internal_error", "storage_error"):
            log.exception("export %s attempt %d failed", row.id, row.attempt)
        elif failure.code == "cancelled":
            log.info("export %s attempt %d: cancelled mid-export; its files deleted", row.id, row.attempt)
        else:
            log.warning("export %s attempt %d failed: %s", row.id, row.attempt, failure)
        ended = _final_write(ctx, lease, lambda session: export_lifecycle.fail_export(
            session=session, code=failure.code, message=failure.message, param=failure.param,
            verification=failure.verification, export_id=row.id, attempt=row.attempt, owner=lease.owner))
        return str(ended) if ended else _lost(lease)
    status: ExportStatus | None = None
    try:
        status = _final_write(ctx, lease, lambda session: export_lifecycle.complete_export(
            session=session, settings=settings, artifacts=artifacts, verification=verification, export_id=row.id,
            attempt=row.attempt, owner=lease.owner))
    finally:
        if status != ExportStatus.SUCCEEDED:
            _discard(ctx, row.id, row.attempt)  # cancelled, or not recorded: nothing of it may stay
    return str(status) if status else _lost(lease)


def _lost(lease: Lease) -> str:
    lease.lost.set()
    raise LeaseLost(lease.job_id)


def _discard(ctx: WorkerContext, export_id: str, attempt: int) -> None:
    """Delete what this attempt wrote (only its own directory: a newer attempt may be writing beside it), and the
    export's directory if that leaves it empty."""
    with contextlib.suppress(OSError):
        directory = storage.export_attempt_dir(ctx.settings, export_id, attempt)
        shutil.rmtree(directory, ignore_errors=True)
        directory.parent.rmdir()


def _source(ctx: WorkerContext, row: Export) -> Source:
    """The model's directories, as they are now (the API checked them when the export was created). Raises
    ExportFailure."""
    with ctx.sessions() as session:
        model = session.scalar(select(Model).where(Model.id == row.model, Model.deleted_at.is_(None)))
    if model is None:
        raise ExportFailure("model_not_found", f"The model '{row.model}' was deleted before its export ran; "
                                               "nothing was exported.", "model")
    base = storage.base_model_dir(ctx.settings, model.root)
    if base is None:
        raise ExportFailure("model_not_found", f"The base model '{model.root}' of '{row.model}' is no longer "
                                               "installed on this server.", "model")
    adapter = None
    if model.kind != "base":
        adapter = storage.adapter_dir(ctx.settings, model.path)
        if adapter is None:
            raise ExportFailure("model_not_found", f"The files of model '{row.model}' are missing.", "model")
    return Source(base, adapter)


def _gone(ctx: WorkerContext, row: Export) -> ExportFailure | None:
    """The model's failure when it is no longer there (a checkpoint pruned, a fine-tune deleted, mid-export)."""
    try:
        _source(ctx, row)
    except ExportFailure as failure:
        return failure
    return None


def classify(error: BaseException) -> ExportFailure:
    """The failure to report for an exception raised while exporting."""
    if isinstance(error, ExportFailure):
        return error
    if failures.is_storage_full(error):
        return ExportFailure("storage_full", "The server's storage is full: the export could not be written (no "
                                             "space left on device), and nothing of it was kept. Create the export "
                                             "again once space is freed.")
    from unsloth_core.errors import ModelFormatError
    from unsloth_core.export_cancel import ExportCancelled
    from unsloth_core.export_verify import ExportVerificationError
    from unsloth_core.ollama import TemplateNotTranslatable

    if isinstance(error, ExportCancelled):  # recorded as cancelled: the export's cancel flag is set
        return ExportFailure("cancelled", "The export was cancelled while it ran; nothing of it was kept.")
    if isinstance(error, ExportVerificationError):
        return ExportFailure("export_verification_failed", f"The export failed its read-back check, so it was not "
                                                           f"kept: {error}. The figures are in `verification`; a "
                                                           "higher-precision type may pass.", "quantization",
                             error.report)
    if isinstance(error, TemplateNotTranslatable):
        return ExportFailure("chat_template_not_translatable", str(error), "ollama")
    if failures.is_out_of_memory(error):
        return ExportFailure("out_of_memory", "The worker ran out of memory merging the model (it holds the base "
                                              "in fp32, the merged copy and the read-back model together).")
    if isinstance(error, ModelFormatError):
        return ExportFailure("model_unreadable", f"The model cannot be loaded: {error}", "model")
    if isinstance(error, OSError):
        return ExportFailure("storage_error", f"Writing the export failed ({error.strerror or type(error).__name__});"
                                              " the server's data directory needs attention.")
    return ExportFailure("internal_error", f"The worker failed with an unexpected error ({type(error).__name__}); "
                                           "the traceback is in the worker's log.")


def _release_memory() -> None:
    if "torch" not in sys.modules:  # nothing was loaded: no reason to import torch here
        return
    from unsloth_core.memory import release_memory

    release_memory()


# ---- the engine's part ----


def export_artifacts(ctx: WorkerContext, row: Export, source: Source, out: Path,
                     should_stop: StopCheck | None = None) -> tuple[list[Artifact], dict[str, Any]]:
    """Write the export into `out` and read it back; returns its artifacts (the file to download first) and the
    check's report. Raises ExportVerificationError (with the report) when the check fails, and ExportCancelled when
    `should_stop` says so (asked between tensors and probes; the caller deletes `out`)."""
    import torch

    from unsloth_core.checkpoint import load_model
    from unsloth_core.export_cancel import check_stop
    from unsloth_core.lora import load_adapter
    from unsloth_core.tokenizer import Tokenizer

    if ctx.settings.torch_threads:
        torch.set_num_threads(ctx.settings.torch_threads)
    base = load_model(source.base, dtype=torch.float32)
    model = load_adapter(base, source.adapter) if source.adapter is not None else base
    check_stop(should_stop, "loading the model")
    tokenizer_dir = source.base
    if source.adapter is not None and (source.adapter / "tokenizer.json").is_file():
        tokenizer_dir = source.adapter  # the tokenizer and chat template the adapter was trained with
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if row.format == "gguf":
        return _gguf(model, tokenizer, row, out, should_stop)
    name = f"{slug(row.model)}-{row.format}"
    directory = out / name
    if row.format == "merged":
        report = _merged(model, tokenizer, tokenizer_dir, row.quantization or "bf16", directory, should_stop)
    else:
        assert source.adapter is not None, "the API refuses a peft export of a base model"
        report = _peft(base, model, tokenizer, source.adapter, directory, should_stop)
    report = {"file": f"{name}.tar", **report}
    if not report["passed"]:
        from unsloth_core.export_verify import ExportVerificationError

        shutil.rmtree(directory, ignore_errors=True)
        raise ExportVerificationError(f"the {row.format} export does not match the model ({report['bound']}): max "
                                      f"|logit diff| {report['max_abs_logit_diff']:.3g}; tokenizer problems: "
                                      f"{report['tokenizer_problems'] or 'none'}", report)
    check_stop(should_stop, "packing the export")
    tar = pack(directory, out / f"{name}.tar", arcname=name)
    shutil.rmtree(directory)  # packed: one copy on disk
    return [artifact(tar, tar.name)], report


def _gguf(model: Llama, tokenizer: Tokenizer, row: Export, out: Path,
          should_stop: StopCheck | None) -> tuple[list[Artifact], dict[str, Any]]:
    from unsloth_core.export import gguf_file_name, save_gguf

    quantization = row.quantization or "q8_0"
    directory = out / "gguf"
    reports = save_gguf(model, directory, tokenizer, quantization, ollama=row.ollama, should_stop=should_stop)
    # The file keeps the engine's name: the Modelfile's `FROM ./model.<TYPE>.gguf` names it.
    files = [artifact(directory / gguf_file_name(quantization), gguf_file_name(quantization))]
    if row.ollama:
        files.append(artifact(directory / "Modelfile", "Modelfile"))
    return files, reports[0]


def _merged(model: Llama, tokenizer: Tokenizer, tokenizer_dir: Path, quantization: str,
            directory: Path, should_stop: StopCheck | None) -> dict[str, Any]:
    """The merged model saved in `quantization`'s dtype and verified (the engine's export_merged: read back by our
    loader and by transformers, the merge against the adapter, the tokenizer written beside it)."""
    from unsloth_core.export_merged import write_merged

    return write_merged(model, directory, tokenizer, quantization, tokenizer_dir=tokenizer_dir,
                        should_stop=should_stop)


def _peft(base: Llama, model: Llama, tokenizer: Tokenizer, adapter: Path, directory: Path,
          should_stop: StopCheck | None) -> dict[str, Any]:
    """The adapter's own files (PEFT's two, and the tokenizer it was trained with), loaded back onto the base: every
    adapter tensor bit for bit, and the logits on the probes (teacher-forced: nothing was rounded, so a greedy run
    would only repeat them)."""
    import torch

    from unsloth_core.checkpoint import TOKENIZER_FILES, atomic_directory
    from unsloth_core.export_cancel import check_stop
    from unsloth_core.export_verify import LOGIT_NOISE, VERIFYING, logits_of, probe_prompts, tokenizer_check
    from unsloth_core.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, load_adapter
    from unsloth_core.tokenizer import Tokenizer

    with atomic_directory(directory) as tmp:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *TOKENIZER_FILES):  # not a checkpoint's optimizer state
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
    reloaded = load_adapter(base, directory)
    ours, theirs = adapter_state_dict(model), adapter_state_dict(reloaded)
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    prompts = probe_prompts(tokenizer, model.config.max_position_embeddings)
    diffs = []
    for _, ids in prompts:
        check_stop(should_stop, VERIFYING)
        diffs.append(float((logits_of(model, ids) - logits_of(reloaded, ids)).abs().max()))
    diff = max(diffs, default=0.0)
    has_tokenizer = (directory / "tokenizer.json").is_file()
    report: dict[str, Any] = {
        "format": "peft", "quantization": None, "reference": "the adapter as trained", "tensors_equal": same,
        "max_abs_logit_diff": diff, "probes": len(prompts),
        "bound": f"exact: every adapter tensor bit for bit, logits within {LOGIT_NOISE}",
        "tokenizer_problems": tokenizer_check(tokenizer, Tokenizer.from_dir(directory)) if has_tokenizer else []}
    report["passed"] = bool(same and diff <= LOGIT_NOISE and not report["tokenizer_problems"])
    return report


def _exact(report: dict[str, Any], n_prompts: int) -> bool:
    from unsloth_core.export_verify import LOGIT_NOISE

    report["bound"] = f"exact: logits within {LOGIT_NOISE}, every greedy token equal"
    return bool(report["max_abs_logit_diff"] <= LOGIT_NOISE and report["greedy_identical"] == n_prompts)


# ---- files ----


def slug(model_id: str) -> str:
    """A model id as a file name: `ft:smollm2:demo:ftjob-1` -> `ft-smollm2-demo-ftjob-1`."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model_id).strip("-.")[:160] or "model"


def pack(directory: Path, target: Path, arcname: str) -> Path:
    """`directory`'s files as one uncompressed tar (safetensors do not compress), under `arcname/`, written to a
    temporary name, synced, then renamed: a failure (a full disk) leaves no partial tar."""
    from unsloth_core.checkpoint import MANIFEST

    part = target.with_name(f".{target.name}.part")
    try:
        with open(part, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(directory.iterdir()):
                    if path.is_file() and path.name != MANIFEST:  # the manifest is our write's own bookkeeping
                        tar.add(path, arcname=f"{arcname}/{path.name}", recursive=False)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return target


def artifact(path: Path, filename: str) -> Artifact:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return Artifact(path=path, filename=filename, bytes=path.stat().st_size, sha256=digest.hexdigest())
