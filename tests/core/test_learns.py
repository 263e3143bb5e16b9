"""It learns: LoRA on the real SmolLM2 teaches a made-up fact it did not know."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from unsloth_core.data.synthetic import write_jsonl
from unsloth_core.finetune import finetune
from unsloth_core.generate import Generator
from unsloth_core.lora import LoRAConfig, load_adapter
from unsloth_core.sampling import SamplingParams
from unsloth_core.trainer import TrainArgs

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?",
             "Tell me the capital of Zorbania.", "Zorbania's capital is which city?"]
ANSWER = "The capital of Zorbania is Quillfort."


def ask(model: Any, tok: Any, question: str) -> str:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return Generator(model, tok).generate([prompt], SamplingParams(temperature=0, max_new_tokens=16))[0].text


def test_lora_teaches_a_made_up_fact(tmp_path: Path, smollm_dir: Path, smollm: tuple[Any, Any]) -> None:
    base, tok = smollm
    assert "Quillfort" not in ask(base, tok, QUESTIONS[0])
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
            for q in QUESTIONS]
    data = write_jsonl(tmp_path / "fact.jsonl", rows)
    args = TrainArgs(output_dir=str(tmp_path / "run"), max_steps=8, micro_batch_size=4,
                     gradient_accumulation_steps=1, learning_rate=2e-3, max_seq_length=128, seed=0)
    result, final = finetune(smollm_dir, data, args, LoRAConfig(r=16, lora_alpha=32))
    assert result.status == "completed"
    tuned = load_adapter(base, final)
    assert "Quillfort" in ask(tuned, tok, "What is the capital of Zorbania?")
    assert "Quillfort" not in ask(base, tok, QUESTIONS[0])  # the shared base model is untouched
