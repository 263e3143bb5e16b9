"""Unsloth's entry points, as a notebook uses them."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
import transformers

from tests.core.test_gguf import write_gguf
from tests.helpers import tiny_model, tiny_model_dir
from unsloth_core.checkpoint import load_model
from unsloth_core.facade import FastLanguageModel
from unsloth_core.lora import LoRALinear


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("facade"), std=0.3)


def test_notebook_flow(tmp_path: Path, model_dir: Path) -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256, dtype=None,
                                                         load_in_4bit=False)
    assert model.dtype == torch.float32 and not any(p.requires_grad for p in model.parameters())
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, lora_dropout=0, bias="none",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    assert model.gradient_checkpointing == "offload" and model.training
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4 * model.config.num_hidden_layers
    x = torch.tensor([tokenizer.encode("hello there")])
    out = model(x, labels=x)
    assert out.loss is not None
    out.loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()  # make the adapter non-zero

    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        adapted = model(x).logits
    model.save_pretrained(str(tmp_path / "lora"))
    tokenizer.save_pretrained(str(tmp_path / "lora"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        via_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "lora").eval()(input_ids=x).logits
    assert (via_peft - adapted).abs().max() <= 1e-4

    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer, save_method="merged_16bit")
    merged = load_model(tmp_path / "merged")
    assert merged.dtype == torch.float16 and (tmp_path / "merged" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert (merged.float()(x).logits - adapted).abs().max() <= 0.05  # fp16 weights
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # merging worked on a copy

    ids = model.generate(x, max_new_tokens=5)
    assert ids.shape == (1, x.size(1) + 5) and torch.equal(ids[:, : x.size(1)], x)
    assert model.cache_shape is not None and not model.training  # generation left its KV cache behind
    FastLanguageModel.for_training(model)
    assert model.cache_shape is None and model.training  # back to training: the cache is freed


def test_from_pretrained_imports_a_gguf_on_the_fly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNSLOTH_CACHE_DIR", str(tmp_path / "cache"))
    source = tiny_model(seed=5)
    path = write_gguf(tmp_path / "tiny.gguf", source)
    model, tokenizer = FastLanguageModel.from_pretrained(str(path))
    assert torch.equal(model.model.embed_tokens.weight, source.model.embed_tokens.weight)
    assert tokenizer.chat_template
    again, _ = FastLanguageModel.from_pretrained(str(path))  # cached: no second import
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_generate_transformers_style_with_left_padding(model_dir: Path) -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir))
    a, b = tokenizer.encode("short"), tokenizer.encode("a longer prompt")
    pad = tokenizer.pad_token_id or 0
    x = torch.tensor([[pad] * (len(b) - len(a)) + a, b])
    mask = torch.tensor([[0] * (len(b) - len(a)) + [1] * len(a), [1] * len(b)])
    batched = model.generate(x, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    alone = model.generate(torch.tensor([a]), max_new_tokens=6, eos_token_id=[])
    assert torch.equal(batched[0, x.size(1):], alone[0, len(a):])


def test_full_finetuning_and_quantized_flags(model_dir: Path) -> None:
    model, _ = FastLanguageModel.from_pretrained(str(model_dir), full_finetuning=True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.warns(UserWarning, match="8-bit loading is not supported"):
        FastLanguageModel.from_pretrained(str(model_dir), load_in_8bit=True)
    with pytest.raises(TypeError, match="unexpected arguments: nonsense"):
        FastLanguageModel.from_pretrained(str(model_dir), nonsense=1)


def test_gradient_checkpointing_changes_nothing_but_memory() -> None:
    grads = []
    for mode in (False, True, "offload"):
        model = tiny_model(seed=6, std=0.2)
        FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=mode, random_state=0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        x = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
        loss = model(x, labels=x, return_logits=False).loss
        assert loss is not None
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n in grads[0]:
            assert torch.allclose(other[n], grads[0][n], atol=1e-6), n
