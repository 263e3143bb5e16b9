"""Continued fine-tuning: a run that starts from an earlier fine-tune's adapter, and whose DPO/GRPO reference policy
is that fine-tune rather than the bare base (SFT -> DPO chains)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_model_dir
from unsloth_core.data.synthetic import fact_rows, made_up_facts, preference_rows, write_jsonl
from unsloth_core.finetune import finetune
from unsloth_core.lora import LoRAConfig, adapter_state_dict, apply_lora, disable_adapters, reference_policy
from unsloth_core.trainer import TrainArgs, TrainerCallbacks

LORA = LoRAConfig(r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), std=0.05)


@pytest.fixture(scope="module")
def sft_adapter(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sft")
    data = write_jsonl(out / "facts.jsonl", fact_rows(8, seed=1))
    _, final = finetune(model_dir, data, args(out / "run", max_steps=4, learning_rate=2e-2), LORA)
    return final


def args(out: Path, **kw: Any) -> TrainArgs:
    base = dict(output_dir=str(out), micro_batch_size=2, max_steps=2, learning_rate=5e-3, max_seq_length=128,
                seed=7, logging_steps=1)
    return TrainArgs(**{**base, **kw})


class Logs(TrainerCallbacks):
    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []

    def on_log(self, metrics: dict[str, Any]) -> None:
        self.logs.append(metrics)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter_model.safetensors"))


def test_training_starts_from_the_earlier_adapter(tmp_path: Path, model_dir: Path, sft_adapter: Path) -> None:
    data = write_jsonl(tmp_path / "more.jsonl", fact_rows(4, seed=2))
    # a learning rate too small to move the weights: what comes out is what went in
    _, final = finetune(model_dir, data, args(tmp_path / "still", learning_rate=1e-12), LORA,
                        init_adapter=sft_adapter)
    start, end = tensors(sft_adapter), tensors(final)
    assert start.keys() == end.keys() and any(v.abs().sum() > 0 for k, v in start.items() if "lora_B" in k)
    for k in start:
        torch.testing.assert_close(end[k], start[k], rtol=0, atol=1e-6)
    _, moved = finetune(model_dir, data, args(tmp_path / "moved"), LORA, init_adapter=sft_adapter)
    assert any(not torch.allclose(tensors(moved)[k], start[k]) for k in start)


def test_dpo_compares_against_the_fine_tune_it_continues(tmp_path: Path, model_dir: Path,
                                                         sft_adapter: Path) -> None:
    """At the first step the policy is the SFT model; so is the reference: every implicit reward is 0. Against the
    bare base (the adapters disabled) it would not be."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(made_up_facts(6)))
    logs = Logs()
    finetune(model_dir, pairs, args(tmp_path / "dpo", method="dpo", max_steps=1), LORA, callbacks=logs,
             init_adapter=sft_adapter)
    first = logs.logs[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    fresh = Logs()
    finetune(model_dir, pairs, args(tmp_path / "base", method="dpo", max_steps=1), LORA, callbacks=fresh)
    assert fresh.logs[0]["rewards/chosen"] == 0.0  # a fresh adapter starts at the base: the base is its reference


def test_the_reference_swap_puts_the_trained_weights_back(model_dir: Path) -> None:
    from unsloth_core.checkpoint import load_model

    model = apply_lora(load_model(model_dir), r=4, alpha=8)
    trained = adapter_state_dict(model)
    for p in trained.values():
        torch.nn.init.normal_(p.data)
    before = {n: p.detach().clone() for n, p in trained.items()}
    model.reference_adapter = {n: torch.zeros_like(p) for n, p in trained.items()}
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), reference_policy(model):
        swapped = model(ids).logits
    model.reference_adapter = None
    with torch.no_grad(), disable_adapters(model):
        base = model(ids).logits
    torch.testing.assert_close(swapped, base)  # zero A and B: the swapped-in adapter adds nothing
    for n, p in adapter_state_dict(model).items():
        assert torch.equal(p, before[n])


def test_a_different_rank_is_refused(tmp_path: Path, model_dir: Path, sft_adapter: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", fact_rows(2))
    with pytest.raises(ValueError, match="rank 4"):
        finetune(model_dir, data, args(tmp_path / "x"), LoRAConfig(r=8), init_adapter=sft_adapter)
