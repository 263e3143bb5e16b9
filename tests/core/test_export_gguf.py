"""GGUF export: a trained adapter merged and written, read back by our importer and by transformers' GGUF loader,
the verification gate, the tokenizer kinds, llama3 RoPE scaling, refusals and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.core import go_template
from tests.core.test_gguf import write_gguf as write_test_gguf
from tests.helpers import make_llama3_like_tokenizer, make_tiny_tokenizer, tiny_model, tiny_model_dir
from unsloth_core.chat_templates import get_chat_template
from unsloth_core.checkpoint import load_model
from unsloth_core.cli import main
from unsloth_core.export_verify import ExportVerificationError
from unsloth_core.facade import FastLanguageModel
from unsloth_core.gguf_import import import_gguf
from unsloth_core.model import Llama
from unsloth_core.ollama import TemplateNotTranslatable, modelfile
from unsloth_core.tokenizer import Tokenizer


def trained_adapter(std: float = 0.3) -> Llama:
    """The tiny model with LoRA on every projection, its adapter made non-zero by a few SGD steps."""
    model = tiny_model(seed=7, std=std)
    FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0, use_gradient_checkpointing=False)
    x = torch.tensor([make_tiny_tokenizer().encode("hello there, a few words to learn")])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        loss = model(x, labels=x).loss
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad()
    return FastLanguageModel.for_inference(model)


def greedy_ids(model: Any, ids: list[int], n: int = 12) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=[] if isinstance(model, Llama) else None)
    return out[0, len(ids):].tolist()


def check_export(model: Llama, tok: Tokenizer, out: Path, types: list[str], prompt: list[int]) -> list[dict[str, Any]]:
    """Export, then load each file in our importer and in transformers' GGUF loader: both give the same greedy
    tokens, and an exact type gives the adapter's own."""
    reports = model.save_pretrained_gguf(str(out), tok, quantization_method=types)
    assert [r["quantization"] for r in reports] == types and all(r["passed"] for r in reports)
    assert json.loads((out / "verification.json").read_text()) == reports
    adapter_tokens = greedy_ids(model, prompt)
    for report in reports:
        name = report["file"]
        ours = load_model(import_gguf(out / name, out.parent / name, progress=False))
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32).eval()
        hf_tokens = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                    do_sample=False)[0, len(prompt):].tolist()
        assert greedy_ids(ours, prompt) == hf_tokens, name
        if report["quantization"] in ("f32", "f16"):
            assert report["max_abs_logit_diff"] <= 1e-4 and report["greedy_identical"] == report["greedy_probes"]
            assert hf_tokens == adapter_tokens, name  # the adapter's own greedy tokens
    assert any(hasattr(m, "lora_A") for m in model.modules())  # the model kept its adapters
    return reports


def test_f32_and_f16_from_a_trained_adapter(tmp_path: Path) -> None:
    model, tok = trained_adapter(), make_tiny_tokenizer()
    reports = check_export(model, tok, tmp_path / "gguf", ["f32", "f16"], tok.encode("hello there"))
    assert all(r["adapter_vs_merged"]["max_abs_logit_diff"] <= 1e-3 for r in reports)


@pytest.mark.slow
def test_smollm2_adapter_to_f16_and_q8_0(smollm_dir: Path, tmp_path: Path) -> None:
    """The acceptance case on the real model: a trained adapter to f16 (identical greedy tokens) and q8_0 (top-1
    agreement measured against the stated bound, in the report)."""
    model, tok = FastLanguageModel.from_pretrained(str(smollm_dir), dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             use_gradient_checkpointing=False, random_state=0)
    x = tok("The capital of France is Paris. The capital of Italy is Rome.", return_tensors="pt").input_ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        loss = model(x, labels=x).loss
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad()
    FastLanguageModel.for_inference(model)
    reports = check_export(model, tok, tmp_path / "gguf", ["f16", "q8_0"], tok.encode("The capital of France is"))
    assert reports[1]["top1_agreement"] >= 0.9 and reports[1]["bound"] == "top-1 agreement >= 0.9"


def test_a_file_that_fails_its_check_is_not_written(tmp_path: Path) -> None:
    """q4_0 of an untrained model whose next-token distributions are flat: its top-1 agreement falls below the
    bound, so the export fails and leaves nothing; an earlier export at the same place is kept."""
    model, tok = tiny_model(seed=3, std=0.5), make_tiny_tokenizer()
    model.save_pretrained_gguf(str(tmp_path / "out"), tok, quantization_method="f32")
    with pytest.raises(ExportVerificationError, match="top-1 agreement") as e:
        model.save_pretrained_gguf(str(tmp_path / "out"), tok, quantization_method="q4_0")
    assert e.value.report["passed"] is False and e.value.report["top1_agreement"] < 0.65
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "Modelfile", "manifest.json", "model.F32.gguf", "verification.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left


def test_unknown_quantization_lists_the_valid_ones(tmp_path: Path) -> None:
    model, tok = tiny_model(), make_tiny_tokenizer()
    with pytest.raises(ValueError, match="q8_0, q5_1, q5_0, q4_1, q4_0") as e:
        model.save_pretrained_gguf(str(tmp_path / "x"), tok, quantization_method="q3_bogus")
    with pytest.raises(ValueError, match="llama-quantize"):
        model.save_pretrained_gguf(str(tmp_path / "x"), tok, quantization_method="q4_k_m")
    with pytest.raises(ValueError, match="ternary"):
        model.save_pretrained_gguf(str(tmp_path / "x"), tok, quantization_method="tq1_0")
    assert "not a GGUF type" in str(e.value) and not (tmp_path / "x").exists()


def test_sentencepiece_vocabulary_round_trips(tmp_path: Path) -> None:
    """A Llama 2 style tokenizer (SentencePiece BPE, byte fallback): written with scores from its merges, it
    tokenizes every probe as before (the check compares), and the weights come back exactly (f32)."""
    source = tiny_model(seed=9, std=0.3)
    hf_dir = import_gguf(write_test_gguf(tmp_path / "spm.gguf", source, spm=True), tmp_path / "hf", progress=False)
    model, tok = load_model(hf_dir), Tokenizer.from_dir(hf_dir)
    report = model.save_pretrained_gguf(str(tmp_path / "out"), tok, quantization_method="f32", ollama=False)[0]
    assert report["passed"] and report["tokenizer_problems"] == [] and report["max_abs_logit_diff"] == 0.0
    back = Tokenizer.from_dir(import_gguf(tmp_path / "out" / "model.F32.gguf", tmp_path / "back", progress=False))
    for text in ("hello world", "  the world is here", "unicode: \u00e9 \u65e5", "</s> x"):
        assert back.encode(text) == tok.encode(text), text
    assert not (tmp_path / "out" / "Modelfile").exists()


def test_llama3_rope_scaling_and_context_length_travel(tmp_path: Path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4096}
    model = tiny_model(seed=2, std=0.3, rope_scaling=scaling, max_position_embeddings=131072, rope_theta=500000.0)
    report = model.save_pretrained_gguf(str(tmp_path / "out"), make_tiny_tokenizer(), "f32")[0]
    assert report["passed"]
    back = load_model(import_gguf(tmp_path / "out" / "model.F32.gguf", tmp_path / "back", progress=False))
    assert back.config.rope_scaling == model.config.rope_scaling
    assert back.config.max_position_embeddings == 131072 and back.config.rope_theta == 500000.0


def test_cli_export_gguf_peft_and_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tiny_model_dir(tmp_path / "base", std=0.3)
    model = FastLanguageModel.get_peft_model(load_model(base), r=4, random_state=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(str(tmp_path / "adapter"))
    common = ["export", "--model", str(base), "--adapter", str(tmp_path / "adapter")]
    assert main([*common, "--format", "gguf", "--quantization", "f16", "--ollama", "--out", str(tmp_path / "g")]) == 0
    assert "verified model.F16.gguf" in capsys.readouterr().out
    assert (tmp_path / "g" / "Modelfile").read_text().startswith("FROM ./model.F16.gguf\n")
    assert main([*common, "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "adapter_config.json").is_file()
    assert main([*common, "--format", "gguf", "--quantization", "q4_k_m", "--out", str(tmp_path / "bad")]) == 2
    assert "llama-quantize" in capsys.readouterr().err and not (tmp_path / "bad").exists()


# SmolLM2-135M-Instruct's template: ChatML with a default system prompt.
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}"
           "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]


def ollama_render(modelfile_text: str, messages: list[dict[str, str]]) -> str:
    """What Ollama sends the model for a chat: the Modelfile's SYSTEM added when the request has no system
    message, then the TEMPLATE over System and Messages (as Ollama's template.Execute passes them)."""
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile_text, re.S)
    system = re.search(r'SYSTEM """(.*?)"""', modelfile_text, re.S)
    assert template is not None
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    data = {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return go_template.render(template.group(1), data)


@pytest.mark.parametrize("tokenizer", [make_tiny_tokenizer(), make_llama3_like_tokenizer(),
                                       make_tiny_tokenizer(SMOLLM2),
                                       get_chat_template(make_llama3_like_tokenizer(), "llama-3.1")],
                         ids=["chatml", "llama-3", "smollm2", "llama-3.1"])
def test_modelfile_template_renders_as_the_chat_template(tokenizer: Tokenizer) -> None:
    text = modelfile("model.F16.gguf", tokenizer, add_bos=False)
    for conversation in (CONVERSATION, CONVERSATION[1:]):
        assert ollama_render(text, conversation) == tokenizer.render_chat(conversation, add_generation_prompt=True)
    stops = re.findall(r'PARAMETER stop "(.*)"', text)
    assert stops == [tokenizer.eos_token] and ("SYSTEM" in text) == (tokenizer.chat_template == SMOLLM2)


def test_modelfile_refuses_a_template_it_cannot_translate(tmp_path: Path) -> None:
    inst = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    tokenizer = make_tiny_tokenizer(inst)
    with pytest.raises(TemplateNotTranslatable, match="ollama=False"):
        tiny_model().save_pretrained_gguf(str(tmp_path / "x"), tokenizer, "f32")
    assert not (tmp_path / "x").exists()
    assert tiny_model().save_pretrained_gguf(str(tmp_path / "x"), tokenizer, "f32", ollama=False)[0]["passed"]
