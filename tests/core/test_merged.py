"""Merged projections (q/k/v and gate/up as one GEMM while the engine generates): the same outputs, no extra memory,
and never a stale weight after the parameters change."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import tiny_model
from unsloth_core.generate import Generator
from unsloth_core.lora import apply_lora
from unsloth_core.merged import MergedProjections, merge_groups, merged_projections
from unsloth_core.model import Llama
from unsloth_core.quant import quantize_model
from unsloth_core.sampling import SamplingParams

IDS = torch.tensor([[5, 9, 17, 3, 44, 2, 8], [1, 2, 3, 4, 5, 6, 7]])


def logits(model: Llama, merged: bool) -> torch.Tensor:
    with torch.no_grad():
        if not merged:
            return model(IDS).logits
        with merged_projections(model) as groups:
            assert groups == 2 * len(model.blocks())
            return model(IDS).logits


def test_merged_projections_give_the_layers_outputs_and_share_their_storage() -> None:
    model = tiny_model(seed=3)
    want = logits(model, merged=False)
    torch.testing.assert_close(logits(model, merged=True), want, rtol=1e-5, atol=1e-5)
    attn = model.blocks()[0].self_attn
    merged, _ = attn.merged._kept  # type: ignore[misc]
    # The parameters are views of the merged weight: q's rows first, then k's, then v's; nothing was copied.
    assert attn.q_proj.weight.data_ptr() == merged.data_ptr()
    assert attn.k_proj.weight.data_ptr() == merged[attn.q_proj.out_features:].data_ptr()
    # Outside the engine's context the layers run one by one again.
    assert attn.merged.weight is None and not attn.merged.active()
    # An in-place update of a parameter (an optimizer step) is read by the merged GEMM too.
    with torch.no_grad():
        attn.k_proj.weight.mul_(1.5)
        model.blocks()[1].mlp.up_proj.weight.add_(0.01)
    torch.testing.assert_close(logits(model, merged=True), logits(model, merged=False), rtol=1e-5, atol=1e-5)


def test_a_parameter_given_new_storage_is_merged_again_not_read_stale() -> None:
    model = tiny_model(seed=4)
    logits(model, merged=True)
    attn = model.blocks()[0].self_attn
    with torch.no_grad():
        attn.v_proj.weight.data = attn.v_proj.weight.data * 2  # the trainer's `p.data = p.data.float()` does this
        model.blocks()[1].mlp.gate_proj.weight = torch.nn.Parameter(model.blocks()[1].mlp.gate_proj.weight * -1)
    torch.testing.assert_close(logits(model, merged=True), logits(model, merged=False), rtol=1e-5, atol=1e-5)
    model.to(torch.float64)  # a conversion drops the merged copies rather than convert them apart from the layers
    assert all(b.self_attn.merged._kept is None for b in model.blocks())
    torch.testing.assert_close(logits(model, merged=True), logits(model, merged=False))


def test_training_forwards_never_read_merged_weights() -> None:
    """With gradients recorded each layer runs itself, so each parameter gets its own gradient."""
    model = tiny_model(seed=5)
    with merged_projections(model):
        loss = model(IDS, labels=IDS).loss
    assert loss is not None
    loss.backward()
    attn = model.blocks()[0].self_attn
    assert attn.q_proj.weight.grad is not None and attn.v_proj.weight.grad is not None


def test_a_model_trains_after_generating() -> None:
    """Generation merges inside `torch.inference_mode()`; the parameters, views of the merged weights from then
    on, must still be usable by autograd (an inference tensor cannot be saved for backward)."""
    model = tiny_model(seed=8)
    Generator(model, None).generate([[5, 9, 17]], SamplingParams(max_new_tokens=2, stop_token_ids=[]))
    assert not model.blocks()[0].self_attn.q_proj.weight.is_inference()
    loss = model(IDS, labels=IDS).loss
    assert loss is not None
    loss.backward()
    assert model.blocks()[0].mlp.gate_proj.weight.grad is not None


def test_lora_and_quantized_layers_are_left_alone() -> None:
    model = apply_lora(tiny_model(seed=6), r=4)
    with merged_projections(model) as groups:
        assert groups == 0
    quantized = quantize_model(tiny_model(seed=6))
    with merged_projections(quantized) as groups:
        assert groups == 0


def test_generation_reads_merged_weights_and_gives_the_same_tokens() -> None:
    model = tiny_model(seed=7)
    params = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=[])
    seen: list[bool] = []
    hook = model.blocks()[0].self_attn.register_forward_pre_hook(lambda m, _: seen.append(m.merged.active()))
    got = Generator(model, None).generate([[5, 9, 17], [3, 4]], params)
    hook.remove()
    assert seen and all(seen)
    want = []
    for prompt in ([5, 9, 17], [3, 4]):  # greedy by recomputing the whole sequence, layer by layer
        ids = list(prompt)
        for _ in range(12):
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        want.append(ids[len(prompt):])
    assert [c.token_ids for c in got] == want


def test_a_nested_context_checks_nothing_again_and_leaves_the_outer_one_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's step enters the context inside a driver's whole run (or a served busy spell): the inner entry
    costs no checks (about 2 ms a step on SmolLM2) and its exit does not switch the outer run's merge off."""
    model = tiny_model(seed=3)
    checks = []
    switch_on = MergedProjections.switch_on

    def counting(self: MergedProjections, layers: Any) -> bool:
        checks.append(1)
        return switch_on(self, layers)

    monkeypatch.setattr(MergedProjections, "switch_on", counting)
    with torch.no_grad(), merged_projections(model) as outer:
        assert len(checks) == outer == 2 * len(model.blocks())
        with merged_projections(model) as inner:
            assert inner == outer
        assert len(checks) == outer  # no second check
        assert all(merged.active() for merged, _ in merge_groups(model))  # still on after the inner exit
    assert not any(merged.active() for merged, _ in merge_groups(model))
