"""The check every export passes before it is handed over: read the written file back with our own GGUF importer
and compare it with the merged model it came from, on probe prompts.

What is compared, for each probe (a few plain texts and, where the tokenizer has a chat template, a chat prompt):
- the tokenizer: the read-back tokenizer's ids for the probe text, and its special ids and chat template;
- the logits along the reference's own greedy continuation (teacher-forced): the largest absolute difference, and
  the share of the continuation's positions whose most likely token agrees (top-1 agreement);
- the greedy continuation of the read-back model itself, token by token.
The reference is the merged model with its weights rounded to the file's type for f32 / f16 / bf16, where the file
must then give the same logits (within float noise) and the same greedy tokens: exact. For the quantized types the
reference is the fp32 merged model, and the top-1 agreement must reach the type's bound in `MIN_TOP1` (measured on
SmolLM2-135M-Instruct; a model with flat next-token distributions, e.g. an untrained one, can fail them, and the
export then fails rather than ship). The figures are returned and written beside the export either way.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unsloth_core.errors import UnslothError
from unsloth_core.export_cancel import StopCheck, check_stop
from unsloth_core.model import Llama
from unsloth_core.tokenizer import Tokenizer

EXACT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Teacher-forced top-1 agreement (over the greedy continuations) with the fp32 merged model that a quantized file
# must reach. Measured on SmolLM2-135M-Instruct with these probes: q8_0 0.950, q5_1 0.838, q4_0 0.738 (a 135M model
# has many near-ties; larger models agree more). The bounds sit below those, to catch a broken file, not noise.
MIN_TOP1 = {"q8_0": 0.90, "q5_1": 0.75, "q5_0": 0.75, "q4_1": 0.65, "q4_0": 0.65}
LOGIT_NOISE = 1e-4  # fp32 summation order, for the exact types
PROBES = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
          "Prices rose 12.5% in 2024 \u2014 caf\u00e9 \u00fcber alles!")
NEW_TOKENS = 16
VERIFYING = "comparing the export with the model"  # where a cancel found it


class ExportVerificationError(UnslothError):
    """The exported file does not behave as the model it came from; nothing was written. `report` has the figures."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


def probe_prompts(tokenizer: Tokenizer, max_len: int) -> list[tuple[str, list[int]]]:
    texts = [(text, tokenizer.encode(text)) for text in PROBES]
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        texts.append(("chat", tokenizer.apply_chat_template(messages, add_generation_prompt=True)))
    return [(name, ids[: max_len - NEW_TOKENS]) for name, ids in texts if ids]


def greedy(model: Llama, prompts: Sequence[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens after each prompt, never stopping at an EOS (the engine's KV-cached decoding, tested against
    transformers). The prompts decode as one batch: a decode step reads every weight once for all of them, and the
    verification's decoding was most of an export's time on a CPU when each probe read them alone."""
    from unsloth_core.generate import generate_ids

    if not prompts:
        return []
    width = max(len(ids) for ids in prompts)
    padded = torch.tensor([[0] * (width - len(ids)) + ids for ids in prompts])  # left padding, masked out
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    out = generate_ids(model, padded, mask, max_new_tokens=n, eos_token_id=[])
    return [[int(i) for i in row] for row in out[:, width:].tolist()]


@torch.no_grad()
def logits_of(model: Llama, seq: list[int]) -> Tensor:
    out = model(torch.tensor([seq])).logits
    assert out is not None
    return out[0].float()


def rounded(model: Llama, dtype: torch.dtype) -> Llama:
    """A copy whose weights went through `dtype` (what the file holds), computing in fp32."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
    return out


def teacher_forced(reference: Llama, exported: Llama, seq: list[int], n: int) -> tuple[float, int]:
    """(largest |logit difference|, positions whose most likely token agrees) along `seq`, whose last n tokens are
    the continuation. Agreement is counted where the continuation is predicted: there the model is sure enough to
    pick tokens (inside a prompt a small model's next-token distribution is flat, and a near-tie flips under any
    rounding)."""
    a, b = logits_of(reference, seq), logits_of(exported, seq)
    return float((a - b).abs().max()), int((a[-n - 1:-1].argmax(-1) == b[-n - 1:-1].argmax(-1)).sum())


def compare(reference: Llama, exported: Llama, prompts: list[tuple[str, list[int]]],
            continuations: list[list[int]] | None = None, should_stop: StopCheck | None = None) -> dict[str, Any]:
    """The figures of the module docstring; `continuations`: the reference's greedy ones, when already decoded.
    `should_stop` is asked between probes (export_cancel.py)."""
    check_stop(should_stop, VERIFYING)
    if continuations is None:
        continuations = greedy(reference, [ids for _, ids in prompts], NEW_TOKENS)
    forced = []
    for (_, ids), c in zip(prompts, continuations, strict=True):
        check_stop(should_stop, VERIFYING)
        forced.append(teacher_forced(reference, exported, ids + c, len(c)))
    check_stop(should_stop, VERIFYING)
    # where every teacher-forced argmax agrees, the exported model's own greedy run is the same tokens
    redo = [i for i, ((_, same), c) in enumerate(zip(forced, continuations)) if same != len(c)]
    own = dict(zip(redo, greedy(exported, [prompts[i][1] for i in redo], NEW_TOKENS)))
    rows = []
    for i, ((name, ids), c, (diff, same)) in enumerate(zip(prompts, continuations, forced)):
        prefix = next((j for j, (x, y) in enumerate(zip(c, own.get(i, c))) if x != y), NEW_TOKENS)
        rows.append({"probe": name, "prompt_tokens": len(ids), "max_abs_logit_diff": diff,
                     "top1_agreement": same / len(c), "greedy_tokens_equal": prefix})
    return {"probes": rows, "max_abs_logit_diff": max((d for d, _ in forced), default=0.0),
            "top1_agreement": sum(s for _, s in forced) / max(sum(len(c) for c in continuations), 1),
            "greedy_identical": sum(r["greedy_tokens_equal"] == NEW_TOKENS for r in rows),
            "greedy_probes": len(prompts), "new_tokens": NEW_TOKENS}


def tokenizer_check(ours: Tokenizer, theirs: Tokenizer) -> list[str]:
    """What the read-back tokenizer does differently (empty: nothing)."""
    problems = []
    texts = [*PROBES, "  two spaces\n\nnew lines\ttab 1234567 \U0001F600"]
    if ours.chat_template:
        texts.append(ours.render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                      add_generation_prompt=True))
    problems += [f"tokenizes {t!r} differently" for t in texts if ours.encode(t) != theirs.encode(t)]
    for attr in ("bos_token_id", "eos_token_id", "chat_template"):
        if getattr(ours, attr) != getattr(theirs, attr):
            problems.append(f"{attr} is {getattr(theirs, attr)!r}, not {getattr(ours, attr)!r}")
    return problems


def verify_gguf(path: Path, merged: Llama, tokenizer: Tokenizer, quantization: str,
                adapter: Llama | None = None, should_stop: StopCheck | None = None) -> dict[str, Any]:
    """Read `path` back and compare (see the module docstring); returns the report, with `passed`.
    `should_stop` is asked between tensors while reading back and between probes (export_cancel.py)."""
    from unsloth_core.checkpoint import load_model
    from unsloth_core.gguf_import import import_gguf

    with tempfile.TemporaryDirectory(prefix=".verify-", dir=path.parent) as tmp:
        out = import_gguf(path, Path(tmp) / "model", progress=False,
                          between=lambda: check_stop(should_stop, "reading the GGUF file back"))
        exported, read_tokenizer = load_model(out, dtype=torch.float32), Tokenizer.from_dir(out)
    prompts = probe_prompts(tokenizer, merged.config.max_position_embeddings)
    exact = quantization in EXACT
    reference = rounded(merged, EXACT[quantization]) if exact else merged
    report: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size, "quantization": quantization,
                              "reference": f"merged model, weights in {quantization}" if exact
                              else "merged model in fp32", **compare(reference, exported, prompts,
                                                                      should_stop=should_stop)}
    report["tokenizer_problems"] = tokenizer_check(tokenizer, read_tokenizer)
    if exact:
        report["bound"] = f"exact: logits within {LOGIT_NOISE}, every greedy token equal"
        ok = report["max_abs_logit_diff"] <= LOGIT_NOISE and report["greedy_identical"] == len(prompts)
    else:
        report["bound"] = f"top-1 agreement >= {MIN_TOP1[quantization]}"
        ok = report["top1_agreement"] >= MIN_TOP1[quantization]
    if quantization != "f32":  # how far the file is from the fp32 merged model, whatever its type
        vs_merged = compare(merged, exported, prompts, should_stop=should_stop)
        report["vs_fp32_merged"] = {k: v for k, v in vs_merged.items() if k != "probes"}
    if adapter is not None:
        report["adapter_vs_merged"] = adapter_check(adapter, merged, prompts, should_stop)
        ok = ok and report["adapter_vs_merged"]["passed"]
    report["passed"] = bool(ok and not report["tokenizer_problems"])
    return report


def adapter_check(adapter: Llama, merged: Llama, prompts: list[tuple[str, list[int]]],
                  should_stop: StopCheck | None = None) -> dict[str, Any]:
    """The merge itself: the model with its adapters (as trained, in its own dtype and device) against the fp32
    merged one. Held to float noise when the adapter model computes in fp32; reported otherwise."""
    worst = 0.0
    was_training = adapter.training
    adapter.eval()
    try:
        for _, ids in prompts:
            check_stop(should_stop, VERIFYING)
            with torch.no_grad():
                a = adapter(torch.tensor([ids], device=adapter.device)).logits
            assert a is not None
            worst = max(worst, float((a.float().cpu() - logits_of(merged, ids)).abs().max()))
    finally:
        adapter.train(was_training)
    strict = adapter.dtype == torch.float32
    return {"max_abs_logit_diff": worst, "bound": 1e-3 if strict else None,
            "passed": worst <= 1e-3 if strict else True}


def summary(report: dict[str, Any]) -> str:
    return (f"{report['file']}: {report['quantization']}, max |logit diff| {report['max_abs_logit_diff']:.3g}, "
            f"top-1 agreement {report['top1_agreement']:.3f}, greedy identical on {report['greedy_identical']}/"
            f"{report['greedy_probes']} probes ({report['bound']})")

