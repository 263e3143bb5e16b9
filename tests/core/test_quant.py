"""4-bit NF4 base weights (`load_in_4bit`): the format, the layers, LoRA on top, loading, saving and training."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F

from tests.core.test_model_parity import hf_twin
from tests.helpers import tiny_model, tiny_model_dir
from unsloth_core import kernels
from unsloth_core.checkpoint import load_model, save_model
from unsloth_core.facade import FastLanguageModel
from unsloth_core.lora import LoRALinear, apply_lora, load_adapter, lora_layers, save_adapter
from unsloth_core.model import Llama
from unsloth_core.quant import (
    Linear4bit,
    NF4Tensor,
    is_quantized,
    keep_dense,
    linear,
    nf4_code,
    quantize_model,
    weight_bytes,
)

# bitsandbytes' NF4 table (bitsandbytes/functional.py, `get_4bit_type("nf4")`), the levels QLoRA trains against.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
           1.0]


def test_levels_are_bitsandbytes_nf4() -> None:
    assert nf4_code().tolist() == BNB_NF4


def test_each_weight_goes_to_its_nearest_level() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=gen)  # 1850 elements: 28 whole blocks and a partial one
    w[3] = 0.0  # a row of zeros spans a whole block: absmax 0, every value the zero level
    q = NF4Tensor.from_dense(w)
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == 29 * 32 and q.absmax.numel() == 29
    # Brute force: per 64-block absmax, then the level with the smallest distance.
    blocks = F.pad(w.flatten(), (0, 29 * 64 - w.numel())).view(29, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    normed = blocks / absmax.clamp_min(1e-30)
    nearest = (normed.unsqueeze(-1) - nf4_code()).abs().argmin(-1)
    expected = (nf4_code()[nearest] * absmax).flatten()[:w.numel()].view_as(w)
    assert torch.equal(q.dense(), expected)
    assert torch.equal(q.dense()[3], torch.zeros(50))
    again = NF4Tensor.from_dense(q.dense())  # values already on the grid quantize to themselves
    assert torch.equal(again.packed, q.packed) and torch.equal(again.absmax, q.absmax)


def test_storage_is_4_5_bits_per_weight_and_follows_the_tensor_api() -> None:
    w = torch.randn(256, 512)
    q = NF4Tensor.from_dense(w, dtype=torch.bfloat16)
    assert q.shape == w.shape and q.dtype == torch.bfloat16 and q.storage_bytes() * 8 / w.numel() == 4.5
    p = torch.nn.Parameter(q, requires_grad=False)
    assert isinstance(p, NF4Tensor) and not p.requires_grad
    clone = copy.deepcopy(p)
    assert isinstance(clone, NF4Tensor) and torch.equal(clone.dense(), q.dense())
    clone.packed.zero_()
    assert not torch.equal(clone.dense(), q.dense())  # a copy, not a view of the same storage
    assert p.to(torch.float32).dtype == torch.float32 and isinstance(p.to(torch.float32), NF4Tensor)
    with pytest.raises(RuntimeError, match=r"4-bit .* frozen"):
        p.add_(1.0)
    p.copy_(w * 2)  # loading into a 4-bit weight requantizes
    assert torch.equal(p.dense(torch.float32), NF4Tensor.from_dense(w * 2).dense())
    with torch.no_grad():  # any other op runs on the dequantized value
        assert torch.equal(p @ torch.eye(512, dtype=torch.bfloat16), p.dense())


def test_copies_pickles_and_refusals() -> None:
    """A deep copy or a pickled model keeps its 4-bit weights as frozen Parameters (so LoRA still fits on it);
    `.to()` copies; writes through `out=` and asking for a gradient are refused; a 4-bit state dict loads into a
    16-bit model as its dequantized values."""
    model = quantize_model(tiny_model(seed=7))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        w = clone.model.layers[0].mlp.down_proj.weight
        assert isinstance(w, NF4Tensor) and isinstance(w, torch.nn.Parameter) and not w.requires_grad
        assert torch.equal(w.dense(), model.model.layers[0].mlp.down_proj.weight.dense())
        apply_lora(clone, r=2, alpha=4, seed=0)
    q = NF4Tensor.from_dense(torch.randn(8, 64))
    half = q.to(torch.float16)
    half.copy_(torch.zeros(8, 64))
    assert q.dense().abs().sum() > 0  # the original kept its values
    with pytest.raises(RuntimeError, match="would write into a 4-bit"):
        torch.add(torch.ones(8, 64), 1.0, out=q)
    with pytest.raises(RuntimeError, match="cannot be trained"):
        q.requires_grad_(True)
    plain = tiny_model(seed=8)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.model.layers[1].self_attn.o_proj.weight,
                       model.model.layers[1].self_attn.o_proj.weight.dense())


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_matches_the_dequantized_weight_and_keeps_no_dense_copy(autocast: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    w, bias = torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen)
    q = NF4Tensor.from_dense(w)
    x = torch.randn(2, 5, 128, generator=gen, requires_grad=True)
    b1, b2 = bias.clone().requires_grad_(), bias.clone().requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = linear(x, q, b1)
    assert not any(t.numel() >= w.numel() for t in saved)  # nothing the size of the weight waits for backward
    x2 = x.detach().clone().requires_grad_()
    plain_saved: list[torch.Tensor] = []
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(lambda t: plain_saved.append(t) or t, lambda t: t):
        y2 = F.linear(x2, q.dense(torch.float32), b2)
    assert any(t.numel() >= w.numel() for t in plain_saved)  # what a plain linear keeps, and the hook sees
    assert y.dtype == y2.dtype and torch.equal(y, y2)
    dy = torch.randn(y.shape, generator=gen).to(y.dtype)
    y.backward(dy)
    y2.backward(dy)
    assert x.grad is not None and x2.grad is not None and b1.grad is not None and b2.grad is not None
    tol = 1e-2 if autocast else 1e-5
    torch.testing.assert_close(x.grad, x2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=tol, atol=tol)


def dequantized_copy(model: Llama, directory: Path) -> Llama:
    """The 4-bit model's weights as a plain model, through a saved checkpoint (the saving path is tested too)."""
    save_model(model, directory)
    return load_model(directory)


def test_a_4bit_model_computes_its_dequantized_weights(tmp_path: Path) -> None:
    model = quantize_model(tiny_model(seed=3, std=0.3))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert not is_quantized(model.lm_head.weight) and not is_quantized(model.model.embed_tokens.weight)
    plain = dequantized_copy(model, tmp_path / "dense")
    assert not any(is_quantized(p) for p in plain.parameters())
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=1e-6, atol=1e-6)
    fp32 = tiny_model(seed=3, std=0.3)
    assert weight_bytes(model) < weight_bytes(fp32)


@pytest.mark.parametrize("fused", [True, False])
def test_lora_on_a_4bit_base_matches_lora_on_the_dequantized_base(tmp_path: Path, fused: bool) -> None:
    """Gradients (fused LoRA kernels and PEFT-style layers) equal those over the dequantized weights, and the
    saved adapter reproduces our logits in PEFT on the dequantized base saved by us."""
    quantized = quantize_model(tiny_model(seed=4, std=0.3))
    plain = dequantized_copy(quantized, tmp_path / "base")
    pair = [apply_lora(m, r=4, alpha=8, seed=0) for m in (quantized, plain)]
    for m in pair:
        m.train()
        for _, layer in lora_layers(m):
            torch.nn.init.normal_(layer.lora_B.weight, 0, 0.1, generator=torch.Generator().manual_seed(5))
    assert all(is_quantized(layer.weight) for _, layer in lora_layers(quantized))
    x = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
    kernels.set_fused_lora(fused)
    try:
        losses = [m(x, labels=x).loss for m in pair]
        for loss in losses:
            assert loss is not None
            loss.backward()
    finally:
        kernels.set_fused_lora(True)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in pair]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * quantized.config.num_hidden_layers
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)

    quantized.eval()
    save_adapter(quantized, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_twin(load_model(tmp_path / "base")), tmp_path / "adapter").eval()
    reloaded = load_adapter(quantize_model(tiny_model(seed=4, std=0.3)), tmp_path / "adapter")
    bases = [m for m in reloaded.modules() if isinstance(m, LoRALinear | Linear4bit)]
    assert len(bases) == 7 * reloaded.config.num_hidden_layers and all(is_quantized(m.weight) for m in bases)
    with torch.no_grad():
        ours = quantized(x).logits
        assert (theirs(input_ids=x).logits - ours).abs().max() <= 1e-4
        assert torch.equal(reloaded(x).logits, ours)


def test_merged_export_of_a_4bit_model_is_16bit(tmp_path: Path) -> None:
    model = apply_lora(quantize_model(tiny_model(seed=6, std=0.3)), r=4, alpha=8, seed=0)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear)
    with torch.no_grad():
        layer.lora_B.weight.fill_(0.05)
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.eval()(x).logits
    model.save_pretrained_merged(str(tmp_path / "merged"), save_method="merged_16bit")
    merged = load_model(tmp_path / "merged", dtype=torch.float32)
    assert not any(is_quantized(p) for p in merged.parameters())
    with torch.no_grad():
        assert (merged(x).logits - before).abs().max() <= 5e-2  # bf16 rounding of the merged weights


def test_from_pretrained_load_in_4bit(tmp_path: Path) -> None:
    directory = tiny_model_dir(tmp_path, std=0.3)
    model, tokenizer = FastLanguageModel.from_pretrained(str(directory), load_in_4bit=True)
    full, _ = FastLanguageModel.from_pretrained(str(directory))
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 7 * model.config.num_hidden_layers
    projections = [m.weight for m in full.modules() if isinstance(m, torch.nn.Linear) and m is not full.lm_head]
    quantized = [m.weight for m in model.modules() if isinstance(m, Linear4bit)]
    assert sum(w.storage_bytes() for w in quantized) * 7 < sum(w.numel() * 4 for w in projections)  # 4.5 of 32
    reference = quantize_model(copy.deepcopy(full))  # quantizing while loading = quantizing after
    for a, b in zip(quantized, [m.weight for m in reference.modules() if isinstance(m, Linear4bit)], strict=True):
        assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)

    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0)
    ids = torch.tensor([tokenizer.encode("some text to learn")])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        assert loss is not None
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    FastLanguageModel.for_inference(model)
    assert model.generate(ids, max_new_tokens=4).shape == (1, ids.size(1) + 4)

    with pytest.raises(ValueError, match="full_finetuning"):
        FastLanguageModel.from_pretrained(str(directory), load_in_4bit=True, full_finetuning=True)
    with pytest.warns(UserWarning, match="8-bit loading is not supported"):
        FastLanguageModel.from_pretrained(str(directory), load_in_8bit=True)


@pytest.mark.slow
def test_smollm2_in_4bit_still_knows_paris(smollm_dir: Path) -> None:
    from unsloth_core.generate import Generator
    from unsloth_core.sampling import SamplingParams
    from unsloth_core.tokenizer import Tokenizer

    model, tok = load_model(smollm_dir, load_in_4bit=True), Tokenizer.from_dir(smollm_dir)
    assert weight_bytes(model) < 0.35 * 538e6  # of the fp32 model's 538 MB (most of what is left: the embedding)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    out = Generator(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=8))[0]
    assert "Paris" in out.text


def kept(model: Llama) -> list[torch.Tensor]:
    """The dequantized copies the model's 4-bit weights hold now."""
    return [p.kept[1] for p in model.parameters() if isinstance(p, NF4Tensor) and p.kept is not None]


def test_for_inference_keeps_dense_weights_that_generate_as_the_uncached_path() -> None:
    """On a CPU, for_inference keeps each 4-bit weight dequantized: one copy per weight, the tokens and logits of
    the per-product dequantization, and never a stale copy (LoRA steps do not touch it; a write into the 4-bit
    weight or a merge replaces it); for_training and the trainer drop them."""
    model = apply_lora(quantize_model(tiny_model(seed=7, std=0.3)), r=4, alpha=8, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=6, eos_token_id=[]), model(ids).logits

    uncached = run()
    FastLanguageModel.for_inference(model)
    assert not kept(model)  # made on first use
    cached = run()
    assert len(kept(model)) == 7 * model.config.num_hidden_layers
    assert all(torch.equal(a, b) for a, b in zip(cached, uncached, strict=True))
    first = kept(model)
    assert all(torch.equal(a, b) for a, b in zip(run(), uncached, strict=True))
    assert all(a is b for a, b in zip(kept(model), first, strict=True))  # made once, then read

    FastLanguageModel.for_training(model)  # a LoRA step, then inference again
    assert not kept(model) and not any(p.keep for p in model.parameters() if isinstance(p, NF4Tensor))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(ids, labels=ids).loss
    assert loss is not None
    loss.backward()
    optimizer.step()
    FastLanguageModel.for_inference(model)
    stepped = run()
    keep_dense(model, False)
    assert all(torch.equal(a, b) for a, b in zip(stepped, run(), strict=True))
    assert not torch.equal(stepped[1], uncached[1])  # the step changed the model, and the cache followed

    FastLanguageModel.for_inference(model)  # a write into a 4-bit weight: the kept copy goes with it
    run()
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(5)))
    assert layer.weight.kept is None
    after_write = run()
    keep_dense(model, False)
    assert all(torch.equal(a, b) for a, b in zip(after_write, run(), strict=True))

    FastLanguageModel.for_inference(model)  # merged: the layer's weight is a new, dense one
    run()
    attn = model.model.layers[1].self_attn.q_proj
    assert isinstance(attn, LoRALinear)
    attn.merge()
    assert not is_quantized(attn.weight)
    merged = run()
    keep_dense(model, False)
    assert all(torch.equal(a, b) for a, b in zip(merged, run(), strict=True))


def test_training_drops_kept_weights_left_by_for_inference(tmp_path: Path) -> None:
    from tests.helpers import make_tiny_tokenizer
    from unsloth_core.data import tokenize_sft
    from unsloth_core.data.examples import TextExample
    from unsloth_core.trainer import TrainArgs, Trainer

    tok = make_tiny_tokenizer()
    model = apply_lora(quantize_model(tiny_model(seed=8, std=0.3)), r=4, alpha=8, seed=0)
    FastLanguageModel.for_inference(model)
    model.generate(torch.tensor([tok.encode("some text")]), max_new_tokens=2)
    assert kept(model)
    rows = [tokenize_sft(TextExample(t), tok, 64) for t in ("one sample", "another sample")]
    Trainer(model, TrainArgs(micro_batch_size=2, max_steps=1, output_dir=str(tmp_path)), rows,
            pad_id=tok.pad_token_id or 0).train()
    assert not kept(model)  # trained in its 4-bit footprint, as QLoRA does
