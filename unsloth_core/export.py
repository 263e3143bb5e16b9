"""`save_pretrained_gguf`: a directory holding the model as GGUF files (one per quantization), an Ollama
`Modelfile` beside them, and `verification.json` with what each file's read-back check compared and measured.

The directory is written atomically (checkpoint.atomic_directory): a file that fails its check, a full disk or any
other error leaves nothing behind, and an earlier export at the same place stays as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unsloth_core.checkpoint import atomic_directory
from unsloth_core.export_cancel import StopCheck
from unsloth_core.export_gguf import merged_copy, quantization_type, write_gguf
from unsloth_core.export_verify import ExportVerificationError, summary, verify_gguf
from unsloth_core.model import Llama
from unsloth_core.tokenizer import Tokenizer

VERIFICATION = "verification.json"


def gguf_file_name(quantization: str) -> str:
    return f"model.{quantization.upper()}.gguf"


def save_gguf(model: Llama, directory: str | os.PathLike[str], tokenizer: Tokenizer,
              quantization_method: str | Sequence[str] = "fast_quantized", ollama: bool = True,
              should_stop: StopCheck | None = None) -> list[dict[str, Any]]:
    """Write and verify one GGUF per quantization method (and the Modelfile, for the first); returns the
    verification reports. Raises ValueError for an unknown method (listing the valid ones) before any work, and
    ExportVerificationError, leaving nothing, when a file does not behave as the model. `should_stop` is asked
    between tensors and probes; True raises ExportCancelled, leaving nothing (export_cancel.py)."""
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    types = list(dict.fromkeys(quantization_type(m) for m in methods))
    if not types:
        raise ValueError("quantization_method names no type")
    modelfile_text = None
    if ollama:  # an untranslatable chat template is refused before any work
        from unsloth_core.export_gguf_tokenizer import adds_special_tokens
        from unsloth_core.ollama import modelfile

        modelfile_text = modelfile(gguf_file_name(types[0]), tokenizer, add_bos=adds_special_tokens(tokenizer)[0])
    merged = merged_copy(model, should_stop)
    reports = []
    with atomic_directory(directory, manifest={"format": "gguf", "quantizations": types}) as tmp:
        for q in types:
            path = write_gguf(merged, tokenizer, tmp / gguf_file_name(q), q, should_stop=should_stop)
            report = verify_gguf(path, merged, tokenizer, q, adapter=model if model.lora_config else None,
                                 should_stop=should_stop)
            reports.append(report)
            if not report["passed"]:
                raise ExportVerificationError(f"the exported file does not match the model, so it was not "
                                              f"written: {summary(report)}; {report['tokenizer_problems']}", report)
        if modelfile_text is not None:
            (tmp / "Modelfile").write_text(modelfile_text)
        (tmp / VERIFICATION).write_text(json.dumps(reports, indent=2) + "\n")
    return reports


def read_verification(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    data = json.loads((Path(directory) / VERIFICATION).read_text())
    return data if isinstance(data, list) else []
