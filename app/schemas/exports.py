"""Export shapes: the create body (a model id, a format, its quantization, an Ollama Modelfile or not), the export
object, its list and its deletion."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from app.schemas.common import Identifier

ExportFormat = Literal["gguf", "merged", "peft"]
ExportStatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# The GGUF types the engine writes (unsloth_core.export_gguf.QUANTIZATIONS, which the API does not import: it loads
# torch; a test keeps the two the same). A merged model takes the first three, as the dtype of its safetensors.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
MERGED_DTYPES = ("f32", "f16", "bf16")
DEFAULT_QUANTIZATION = {"gguf": "q8_0", "merged": "bf16"}  # Unsloth's "fast_quantized"; the CLI's merged default
Quantization = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]


def _known_quantization(value: Any) -> Any:
    """An unknown type is refused with the list (and, for the K-quants Unsloth users know, where to get them)."""
    if isinstance(value, str) and value not in GGUF_TYPES:
        lowered = value.lower()
        why = (" (a K-quant or i-quant: the gguf package cannot write those; make one from an f16 export with "
               "llama.cpp's llama-quantize)" if "_k" in lowered or lowered.startswith("iq") else "")
        raise ValueError(f"{value!r} is not a supported quantization{why}; use one of {', '.join(GGUF_TYPES)}")
    return value


class ExportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[Identifier, Field(min_length=1, max_length=512)]  # a fine-tune, a checkpoint or a base model
    format: ExportFormat
    # gguf: the GGUF type (default q8_0); merged: the weights' dtype, f32, f16 or bf16 (default bf16); peft: none
    quantization: Annotated[Quantization | None, BeforeValidator(_known_quantization)] = None
    ollama: StrictBool = False  # gguf only: an Ollama Modelfile beside the file

    @field_validator("quantization")
    @classmethod
    def _fits_format(cls, value: str | None, info: ValidationInfo) -> str | None:
        fmt = info.data.get("format")
        if value is None or fmt is None:
            return value
        if fmt == "peft":
            raise ValueError("a peft export is the adapter as trained; it takes no quantization")
        if fmt == "merged" and value not in MERGED_DTYPES:
            raise ValueError(f"a merged export is safetensors in {', '.join(MERGED_DTYPES)}; {value} is a GGUF "
                             "type: use format 'gguf' for it")
        return value

    @field_validator("ollama")
    @classmethod
    def _gguf_only(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("format") not in (None, "gguf"):
            raise ValueError("an Ollama Modelfile goes with a GGUF file; use format 'gguf'")
        return value


class ExportError(BaseModel):
    code: str
    message: str
    param: str | None = None


class ExportObject(BaseModel):
    id: str
    object: Literal["export"] = "export"
    created_at: int
    model: str
    format: ExportFormat
    quantization: str | None = None  # resolved (the default filled in); None for peft
    ollama: bool
    status: ExportStatusName
    error: ExportError | None = None
    # the artifact's file id first (the GGUF, or the .tar of a merged or PEFT directory), then the Modelfile's;
    # downloadable with GET /v1/files/{id}/content (range requests accepted)
    result_files: list[str]
    # what the read-back check compared and measured (also for a failed check: its figures); None until it ran
    verification: dict[str, Any] | None = None
    cancel_requested: bool = False
    started_at: int | None = None
    finished_at: int | None = None


class ExportList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExportObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class ExportDeleted(BaseModel):
    id: str
    object: Literal["export"] = "export"
    deleted: bool
