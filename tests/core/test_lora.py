"""LoRA against PEFT on transformers' Llama with the same weights and adapter init, fp32."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import peft
import pytest
import torch
import transformers

from tests.core.test_model_parity import hf_twin
from tests.helpers import tiny_model
from unsloth_core.checkpoint import load_model, save_model
from unsloth_core.lora import (
    ALL_LINEAR,
    LoRALinear,
    apply_lora,
    disable_adapters,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
    strip_lora,
    unmerge_lora,
)
from unsloth_core.model import Llama

R, ALPHA = 4, 8


def adapted_pair(dropout: float = 0.0, rslora: bool = False, tied: bool = True, modules_to_save: list[str] | None
                 = None, std: float = 0.5) -> tuple[Llama, peft.PeftModel]:
    """Ours and PEFT's, sharing base weights and with identical (non-zero) adapter weights."""
    base = tiny_model(seed=21, tie_word_embeddings=tied, std=std)
    hf = hf_twin(base)
    ours = apply_lora(copy.deepcopy(base), r=R, alpha=ALPHA, dropout=dropout, use_rslora=rslora, seed=0,
                      modules_to_save=modules_to_save)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                                                     target_modules=list(ALL_LINEAR), use_rslora=rslora,
                                                     modules_to_save=modules_to_save))
    # B starts at zero; make the adapter do something. Drawn from its own generator: from the global one, B (and
    # so every comparison below) changed with the tests that ran before, and a bf16 comparison failed one run in
    # a clean clone (issue 15).
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            layer.lora_B.weight.normal_(0, 0.1, generator=g)
            peft_layer = theirs.get_submodule("base_model.model." + name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    return ours, theirs


def batch(n: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rslora", [False, True])
def test_logits_and_grads_match_peft(rslora: bool) -> None:
    # Weights at a realistic scale (logits of order 1): fp32 summation order differs between the two, and huge
    # logits would turn that rounding into absolute differences above the 1e-5 bound.
    ours, theirs = adapted_pair(rslora=rslora, std=0.15)
    x = batch()
    a = ours(x, labels=x)
    b = theirs(input_ids=x, labels=x)
    assert a.logits is not None
    assert (a.logits - b.logits).abs().max() <= 1e-5
    assert a.loss is not None
    a.loss.backward()
    b.loss.backward()
    for name, layer in lora_layers(ours):
        peft_layer = theirs.get_submodule("base_model.model." + name)
        for ab in ("lora_A", "lora_B"):
            g_ours = getattr(layer, ab).weight.grad
            g_theirs = getattr(peft_layer, ab)["default"].weight.grad
            assert g_ours is not None and (g_ours - g_theirs).abs().max() <= 1e-4, (name, ab)


def test_only_adapters_train() -> None:
    model = apply_lora(tiny_model(), r=R, alpha=ALPHA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(ALL_LINEAR) * model.config.num_hidden_layers
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())  # names kept


def test_twenty_adamw_steps_track_peft() -> None:
    ours, theirs = adapted_pair()
    opt_a = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    opt_b = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3)
    for step in range(20):
        x = batch(seed=step)
        la = ours(x, labels=x).loss
        lb = theirs(input_ids=x, labels=x).loss
        assert la is not None
        assert abs(la.item() - lb.item()) <= 1e-3 * abs(lb.item()), step
        la.backward()
        lb.backward()
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()


def test_dropout_is_applied_to_the_lora_branch_only() -> None:
    model = apply_lora(tiny_model(), r=R, alpha=ALPHA, dropout=0.5).train()
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.1)
    x = batch()
    torch.manual_seed(0)
    a = model(x).logits
    torch.manual_seed(1)
    b = model(x).logits
    assert a is not None and b is not None and not torch.equal(a, b)  # dropout active
    with disable_adapters(model):
        c, d = model(x).logits, model(x).logits
    assert c is not None and torch.equal(c, d)  # the base path has no dropout


def test_our_adapter_loads_in_peft(tmp_path: Path) -> None:
    ours, _ = adapted_pair()
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    base = tiny_model(seed=21)
    loaded = peft.PeftModel.from_pretrained(hf_twin(base), tmp_path / "adapter").eval()
    x = batch()
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - ours(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_peft_adapter_loads_in_ours(tmp_path: Path, modules_to_save: list[str] | None) -> None:
    _, theirs = adapted_pair(tied=False, modules_to_save=modules_to_save)
    if modules_to_save:
        with torch.no_grad():
            theirs.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    theirs.save_pretrained(tmp_path / "peft")
    base = tiny_model(seed=21, tie_word_embeddings=False)
    served = load_adapter(base, tmp_path / "peft")
    x = batch()
    with torch.no_grad():
        assert (served(x).logits - theirs(input_ids=x).logits).abs().max() <= 1e-4
        # The base model is untouched and shared, not copied.
        assert served.model.layers[0].self_attn.q_proj.weight is base.model.layers[0].self_attn.q_proj.weight
        assert (base(x).logits - theirs.get_base_model()(input_ids=x).logits).abs().max() > 0 or modules_to_save


def test_disable_adapters_gives_the_base_model() -> None:
    ours, _ = adapted_pair()
    base = tiny_model(seed=21)
    x = batch()
    with torch.no_grad(), disable_adapters(ours):
        assert torch.equal(ours(x).logits, base(x).logits)
    with torch.no_grad():
        assert not torch.equal(ours(x).logits, base(x).logits)


def test_merge_unmerge_and_merged_export(tmp_path: Path) -> None:
    # Weights at a realistic scale (logits of order 1): merging changes fp32 rounding, which huge logits amplify.
    ours, _ = adapted_pair(std=0.15)
    x = batch()
    with torch.no_grad():
        adapted = ours(x).logits
        merge_lora(ours)
        assert (ours(x).logits - adapted).abs().max() <= 1e-4
        unmerge_lora(ours)
        # (W + d) - d is W only up to fp32 rounding; logits here are ~10, so 1e-3 is a relative 1e-4.
        assert (ours(x).logits - adapted).abs().max() <= 1e-3
    merged = strip_lora(copy.deepcopy(ours))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    save_model(merged, tmp_path / "merged")
    with torch.no_grad():
        assert (load_model(tmp_path / "merged")(x).logits - adapted).abs().max() <= 1e-4
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert (hf(x).logits - adapted).abs().max() <= 1e-4


def test_adapters_on_a_16_bit_base_are_fp32_as_peft_keeps_them() -> None:
    """A bf16 base (how a GPU loads a model) gets fp32 adapters, as PEFT's do; with no autocast the adapter branch
    runs in fp32, so the model computes what the fp32 model with the same adapter computes, to bf16's precision."""
    ours, theirs = adapted_pair(std=0.15)
    ours16 = copy.deepcopy(ours)
    for name, p in ours16.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    fresh = apply_lora(tiny_model(seed=21).to(torch.bfloat16), r=R, alpha=ALPHA, seed=0)
    peft16 = peft.get_peft_model(copy.deepcopy(theirs.base_model.model).to(torch.bfloat16),
                                 peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(ALL_LINEAR)))
    assert {p.dtype for n, p in fresh.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in peft16.named_parameters() if "lora_" in n} == {torch.float32}
    x = batch()
    out = ours16(x, labels=x)
    assert out.logits is not None and out.loss is not None and out.logits.dtype == torch.bfloat16
    expected = ours(x).logits
    assert expected is not None
    # The bound, from what bf16 rounding can produce: bf16 keeps 8 significant bits, so each rounding moves a value
    # by at most u = 2^-8 of itself. On the way to the logits the 16-bit model rounds each base weight once (the
    # embeddings, 7 projections in each of the 2 blocks, the head) and about 15 activations per block (two norms,
    # q/k/v, RoPE, attention, o, gate, up, SwiGLU, down, two residual adds) and the final norm and head: n < 50
    # roundings. Independent rounding errors add like a random walk (Higham and Mary's probabilistic analysis), so
    # the logits' error in norm stays near sqrt(n) * u = 0.028 of their norm (0.015 here). An adapter that were
    # lost or mis-scaled moves them by its whole effect: 0.62 of their norm with these weights.
    error = (out.logits.float() - expected).norm() / expected.norm()
    assert error <= math.sqrt(50) * 2**-8, error
    out.loss.backward()
    grads = [p.grad for n, p in ours16.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_blocks_fuse_only_active_adapter_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks ask each projection, through `AdapterLinear`, for its parts: active LoRA layers fuse (one
    Function for q/k/v, one for the MLP), disabled or merged ones and plain layers run as themselves."""
    from unsloth_core import kernels
    from unsloth_core.lora import disable_adapters, merge_lora

    calls: list[str] = []
    for name in ("lora_qkv", "lora_mlp"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                    _real(*a, **k))[1])
    model = apply_lora(tiny_model(seed=1), r=4)
    model.train()
    x = batch()
    model(x, labels=x)
    assert calls == ["lora_qkv", "lora_mlp"] * len(model.blocks())
    calls.clear()
    with disable_adapters(model):
        model(x, labels=x)
    merge_lora(model)
    model(x, labels=x)
    tiny_model(seed=1).train()(x, labels=x)
    assert calls == []
