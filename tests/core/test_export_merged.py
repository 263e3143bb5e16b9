"""Merged export from the library: adapters folded in, read back by our loader and by transformers, compared with
the adapter model; a directory that does not behave as the model is not written; Unsloth's 4-bit merge refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import make_tiny_tokenizer, tiny_model
from unsloth_core import export_merged
from unsloth_core.export_verify import ExportVerificationError
from unsloth_core.lora import apply_lora, lora_layers


def adapted() -> Any:
    model = apply_lora(tiny_model(seed=3, std=0.2), r=4, alpha=8, seed=0)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.05)
    return model.eval()


def test_a_merged_export_is_checked_by_transformers_and_against_the_adapter(tmp_path: Path) -> None:
    model = adapted()
    report = model.save_pretrained_merged(str(tmp_path / "m"), make_tiny_tokenizer(), save_method="merged_16bit")
    assert report is not None and report["passed"] and report["quantization"] == "f16"
    assert report["max_abs_logit_diff"] <= 1e-4 and report["greedy_identical"] == report["greedy_probes"]
    hf = report["transformers"]
    assert hf["passed"] and hf["max_abs_logit_diff"] <= export_merged.TRANSFORMERS_BOUND
    assert report["adapter_vs_merged"]["passed"]
    saved = json.loads((tmp_path / "m" / "verification.json").read_text())
    assert saved[0]["passed"] and (tmp_path / "m" / "tokenizer.json").is_file()


def test_an_export_that_differs_from_the_model_is_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    from unsloth_core import checkpoint

    save = checkpoint.save_model

    def damaged(model: Any, directory: Any, **kwargs: Any) -> Path:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # what a broken writer would do
        return save(model, directory, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", damaged)
    with pytest.raises(ExportVerificationError) as e:
        adapted().save_pretrained_merged(str(tmp_path / "bad"), make_tiny_tokenizer(), save_method="merged_32bit")
    assert not e.value.report["passed"] and not (tmp_path / "bad").exists()
    assert not list(tmp_path.iterdir())  # no temporary left either


def test_unsloths_4bit_merge_is_refused_with_what_to_do_instead(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="merged_16bit"):
        adapted().save_pretrained_merged(str(tmp_path / "q"), make_tiny_tokenizer(), save_method="merged_4bit")
