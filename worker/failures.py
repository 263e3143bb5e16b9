"""Failures a user can act on, each an error code, a message that says what to change, and the request parameter it
concerns. Anything else is an internal error: logged with its traceback, reported without one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.core.disk_full import is_storage_full as is_storage_full  # the API's answer too (507): one test of "full"


@dataclass
class JobFailure(Exception):
    code: str
    message: str
    param: str | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def model_not_found(model: str) -> JobFailure:
    return JobFailure("model_not_found", f"The base model '{model}' is no longer installed on this server (no "
                                         f"models/{model} in the data dir). Install it again (`unsloth models "
                                         "import`) and create the job again.", "model")


def file_missing(param: str, file_id: str) -> JobFailure:
    return JobFailure("file_not_found", f"The {param.replace('_', ' ')} {file_id} was deleted; upload it again and "
                                        "create the job again.", param)


def file_unreadable(param: str, file_id: str, error: OSError) -> JobFailure:
    reason = error.strerror or type(error).__name__
    return JobFailure("file_unreadable", f"The {param.replace('_', ' ')} {file_id} cannot be read ({reason}); "
                                         "upload it again and create the job again.", param)


def storage_full(job_id: str, checkpoint_step: int | None) -> JobFailure:
    """What a job paused for a full disk says: it is not the user's fault, and resuming it is all there is to do."""
    where = (f"from its last checkpoint (step {checkpoint_step})" if checkpoint_step else
             "from the beginning (it had saved no checkpoint)")
    return JobFailure("storage_full", "The server's storage is full: the job's checkpoint or adapter could not be "
                                      "written or recorded (no space left on device). The job is paused with what it "
                                      "had saved; once space is freed, resume it (POST /v1/fine_tuning/jobs/"
                                      f"{job_id}/resume) and it continues {where}.", None)


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("out of memory", "DefaultCPUAllocator", "CUBLAS_STATUS_ALLOC_FAILED"))


def out_of_gpu_memory(error: BaseException) -> bool:
    """A GPU's memory, not the host's: torch's own error, or a CUDA, cuBLAS or Triton one that says so."""
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error)
    return not isinstance(error, MemoryError) and "DefaultCPUAllocator" not in text and any(
        s in text for s in ("CUDA", "CUBLAS", "cuda", "Triton", "GPU"))


def classify(error: BaseException, *, model: str, method_type: str, hyperparameters: dict[str, Any]) -> JobFailure:
    """The failure to report for an exception raised while loading or training."""
    from unsloth_core.data import DataFileError
    from unsloth_core.errors import ModelFormatError, UnslothError
    from unsloth_core.graders import GraderError

    hp = f"method.{method_type}.hyperparameters"
    if isinstance(error, JobFailure):
        return error
    if is_out_of_memory(error):
        where = "GPU" if out_of_gpu_memory(error) else "host"
        return JobFailure("out_of_memory", (
            f"Training ran out of {where} memory with batch_size={hyperparameters.get('batch_size')} and "
            f"max_seq_length={hyperparameters.get('max_seq_length')}. Lower {hp}.batch_size (the examples of a "
            f"batch are in memory together) or {hp}.max_seq_length, then create the job again."), f"{hp}.batch_size")
    if isinstance(error, DataFileError):
        return JobFailure(f"invalid_{error.role}_file", f"The {error.role} data cannot be used: {error}",
                          f"{error.role}_file")
    if isinstance(error, GraderError):  # python graders switched off since the job was made, no sandbox here, ...
        return JobFailure("grader_unavailable", f"The job's grader cannot run on this server: {error}",
                          "method.reinforcement.grader")
    if isinstance(error, ModelFormatError):
        return JobFailure("model_unreadable", f"The base model '{model}' cannot be loaded: {error}", "model")
    if isinstance(error, UnslothError | ValueError):
        return JobFailure("invalid_request", str(error), None)
    if isinstance(error, OSError):
        return JobFailure("storage_error", f"Reading or writing the job's files failed "
                                           f"({error.strerror or type(error).__name__}); the server's data "
                                           "directory needs attention before the job is created again.", None)
    return JobFailure("internal_error", f"The worker failed with an unexpected error ({type(error).__name__}); "
                                        "the traceback is in the worker's log.", None)
