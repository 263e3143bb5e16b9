"""Unsloth's entry points, as a notebook uses them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers

from tests.core.test_gguf import write_gguf
from tests.helpers import tiny_model, tiny_model_dir
from unsloth_core.checkpoint import load_model
from unsloth_core.facade import FastLanguageModel
from unsloth_core.lora import LoRALinear
from unsloth_core.sampling import Sampler, SamplingParams
from unsloth_core.streamer import TextStreamer


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


ALPACA = "Below is an instruction.\n\n### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"


def notebook_inference_cells(model: Any, tokenizer: Any, text_streamer_cls: Any) -> list[Any]:
    """The inference cells of Unsloth's Llama-3 conversational and Alpaca notebooks, as written there (`"cuda"`
    made `"cpu"`): chat template to a tensor, generate, batch_decode, and the same with a streamer."""
    out = []
    messages = [{"role": "user", "content": "Continue the fibonnaci sequence: 1, 1, 2, 3, 5, 8,"}]
    inputs = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=False).to("cpu")
    outputs = model.generate(input_ids=inputs, max_new_tokens=12, use_cache=True, temperature=1.5, min_p=0.1)
    out += [outputs, tokenizer.batch_decode(outputs)]
    text_streamer = text_streamer_cls(tokenizer, skip_prompt=True)
    out.append(model.generate(input_ids=inputs, streamer=text_streamer, max_new_tokens=16, use_cache=True,
                              temperature=1.5, min_p=0.1))
    inputs = tokenizer([ALPACA.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")],
                       return_tensors="pt").to("cpu")
    outputs = model.generate(**inputs, max_new_tokens=12, use_cache=True)
    out += [outputs, tokenizer.batch_decode(outputs)]
    out.append(model.generate(**inputs, streamer=text_streamer_cls(tokenizer), max_new_tokens=16))
    return out


def test_notebook_inference_cells_match_transformers(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir))
    FastLanguageModel.for_inference(model)
    ours = notebook_inference_cells(model, tokenizer, TextStreamer)
    printed = capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    theirs = notebook_inference_cells(hf, hf_tok, transformers.TextStreamer)
    assert printed == capsys.readouterr().out and printed.count("\n") >= 2
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    # transformers' own streamer objects drive the same way from our generate
    notebook_inference_cells(model, tokenizer, transformers.TextStreamer)
    assert capsys.readouterr().out == printed


def test_min_new_tokens_masks_eos_as_transformers_does(model_dir: Path) -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    x = tokenizer(["hello there", "hi"], padding=True, padding_side="left", return_tensors="pt")
    free = model.generate(**x, max_new_tokens=10, eos_token_id=[])
    eos = int(free[0, x.input_ids.size(1) + 2])  # a token row 0 picks third: as its EOS it ends the row early
    t = x.input_ids.size(1)
    for minimum in (0, 6):
        kw: dict[str, Any] = dict(max_new_tokens=10, min_new_tokens=minimum, eos_token_id=eos, pad_token_id=0)
        ours = model.generate(**x, **kw)
        assert torch.equal(ours, hf.generate(**x, **kw, do_sample=False)), minimum
        if minimum == 0:
            assert ours[0, t + 2] == eos
        else:
            assert (ours[:, t:t + minimum] != eos).all()


def test_sampler_min_new_tokens_is_per_row() -> None:
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, min_new_tokens=3)]
    sampler = Sampler(params, vocab_size=5, device=torch.device("cpu"), stop_ids=[{4}, {4}])
    logits = torch.tensor([[0.0, 1.0, 0.0, 0.0, 9.0]] * 2)
    assert not sampler.plain_greedy
    chosen = [sampler.sample(logits).tolist() for _ in range(4)]
    assert chosen == [[4, 1], [4, 1], [4, 1], [4, 4]]
    assert sampler.plain_greedy  # past every minimum: the engine's shared argmax again
    with pytest.raises(ValueError, match="stop token ids"):
        Sampler(params, vocab_size=5, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingParams(min_new_tokens=-1)


def test_generate_refuses_what_it_cannot_honour(model_dir: Path) -> None:
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir))
    x = tokenizer("hi", return_tensors="pt")
    with pytest.raises(ValueError, match="num_beams=4"):
        model.generate(**x, num_beams=4)
    with pytest.raises(TypeError, match="watermarking_config"):
        model.generate(**x, watermarking_config={})
    with pytest.raises(ValueError, match="batch of one"):
        model.generate(**tokenizer(["a", "b"], return_tensors="pt"), streamer=TextStreamer(tokenizer))
    assert model.generate(**x, num_beams=1, return_dict_in_generate=False, max_new_tokens=2).shape == (1, 4)
    assert model.generate(inputs=x.input_ids, max_length=5).shape == (1, 5)
    # transformers 5's apply_chat_template mapping goes in as input_ids too
    mapping = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], return_tensors="pt",
                                            return_dict=True)
    assert torch.equal(model.generate(input_ids=mapping, max_new_tokens=3),
                       model.generate(**mapping, max_new_tokens=3))
