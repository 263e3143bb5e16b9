"""Merged export: the adapters folded into the base (in fp32), saved as a Hugging Face directory in 32 or 16 bits,
and checked before it is handed over.

Read back twice: by our loader (logits within float noise of the merged model rounded to the file's dtype, every
greedy token equal) and, where transformers is installed, by `LlamaForCausalLM` (what the user will load it with:
logits within TRANSFORMERS_BOUND of ours on the same rounded weights, the same greedy tokens); and the merge itself
against the adapter model. A directory that fails is not written; `verification.json` beside the weights says what
was compared and the figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from unsloth_core.export_cancel import StopCheck, check_stop
from unsloth_core.export_verify import (
    EXACT,
    LOGIT_NOISE,
    NEW_TOKENS,
    VERIFYING,
    ExportVerificationError,
    adapter_check,
    compare,
    greedy,
    logits_of,
    probe_prompts,
    rounded,
    summary,
    tokenizer_check,
)
from unsloth_core.model import Llama
from unsloth_core.tokenizer import Tokenizer

MERGED_TYPES = {"merged_16bit": None, "merged_32bit": "f32"}  # merged_16bit: bf16 for a bf16 model, else f16
# transformers and we compute the same fp32 model with different kernels and summation orders
TRANSFORMERS_BOUND = 1e-3
TRANSFORMERS_TOKENS = 8  # of the reference's greedy continuation, compared with transformers' argmax
VERIFICATION_FILE = "verification.json"


def save_merged(model: Llama, directory: str | os.PathLike[str], tokenizer: Tokenizer | None,
                quantization: str, should_stop: StopCheck | None = None) -> dict[str, Any]:
    """Merge, save in `quantization` ("f32", "f16", "bf16") with the tokenizer, verify; returns the report. Raises
    ExportVerificationError, writing nothing, when the directory does not behave as the model, and ExportCancelled,
    writing nothing, when `should_stop` says so (asked between blocks and probes, export_cancel.py)."""
    from unsloth_core.checkpoint import atomic_directory

    if quantization not in EXACT:
        raise ValueError(f"a merged export is saved in one of {', '.join(EXACT)}, not {quantization!r}")
    with atomic_directory(Path(directory)) as tmp:
        report = write_merged(model, tmp, tokenizer, quantization, should_stop=should_stop)
        if not report["passed"]:
            raise ExportVerificationError(f"the merged export failed its check: {summary(report)}", report)
        (tmp / VERIFICATION_FILE).write_text(json.dumps([report], indent=2))
    return report


def write_merged(model: Llama, directory: Path, tokenizer: Tokenizer | None, quantization: str,
                 tokenizer_dir: Path | None = None, should_stop: StopCheck | None = None) -> dict[str, Any]:
    """The merged weights and tokenizer (the files of `tokenizer_dir` when given, as trained) written to
    `directory`, and the verification report. On ExportCancelled the caller removes `directory`."""
    from unsloth_core.checkpoint import load_model, save_model
    from unsloth_core.export_gguf import merged_copy

    merged = merged_copy(model, should_stop)
    check_stop(should_stop, "writing the merged model")
    save_model(merged, directory, tokenizer_dir=tokenizer_dir, dtype=EXACT[quantization])
    if tokenizer_dir is None and tokenizer is not None:
        tokenizer.save_pretrained(directory)
    # without a tokenizer (the weights alone), the probes are token ids
    prompts = (probe_prompts(tokenizer, merged.config.max_position_embeddings) if tokenizer is not None else
               [("ids", list(range(1, min(merged.config.vocab_size, 17))))])
    reference = rounded(merged, EXACT[quantization])
    continuations = greedy(reference, [ids for _, ids in prompts], NEW_TOKENS)  # for both read-backs
    report: dict[str, Any] = {"format": "merged", "file": directory.name, "quantization": quantization,
                              "reference": f"merged model, weights in {quantization}",
                              **compare(reference, load_model(directory, dtype=torch.float32), prompts,
                                        continuations, should_stop)}
    report["bound"] = f"exact: logits within {LOGIT_NOISE}, every greedy token equal"
    ok = report["max_abs_logit_diff"] <= LOGIT_NOISE and report["greedy_identical"] == len(prompts)
    report["tokenizer_problems"] = (tokenizer_check(tokenizer, Tokenizer.from_dir(directory))
                                    if tokenizer is not None else [])
    if model.lora_config is not None:
        report["adapter_vs_merged"] = adapter_check(model, merged, prompts, should_stop)
        ok = ok and report["adapter_vs_merged"]["passed"]
    report["transformers"] = transformers_check(directory, reference, prompts, continuations, should_stop)
    ok = ok and report["transformers"].get("passed", True)
    report["passed"] = bool(ok and not report["tokenizer_problems"])
    return report


def transformers_check(directory: Path, reference: Llama, prompts: list[tuple[str, list[int]]],
                       continuations: list[list[int]], should_stop: StopCheck | None = None) -> dict[str, Any]:
    """The directory loaded by transformers' LlamaForCausalLM in fp32, against `reference` on the probes, along the
    first TRANSFORMERS_TOKENS of the reference's greedy `continuations`."""
    if importlib.util.find_spec("transformers") is None:
        return {"skipped": "transformers is not installed here; checked with our loader only"}
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    worst, same = 0.0, 0
    for (_, ids), continuation in zip(prompts, continuations, strict=True):
        check_stop(should_stop, VERIFYING)
        continuation = continuation[:TRANSFORMERS_TOKENS]
        seq = ids + continuation
        with torch.no_grad():
            theirs = hf(torch.tensor([seq])).logits[0].float()
        worst = max(worst, float((theirs - logits_of(reference, seq)).abs().max()))
        n = len(continuation)
        same += bool((theirs[-n - 1:-1].argmax(-1) == torch.tensor(continuation)).all())
    return {"max_abs_logit_diff": worst, "greedy_identical": same, "probes": len(prompts),
            "bound": TRANSFORMERS_BOUND, "passed": worst <= TRANSFORMERS_BOUND and same == len(prompts)}
