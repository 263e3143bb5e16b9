"""Probe prompts answered at each checkpoint: the held-out prompts by default or the user's, greedy answers that
leave training exactly as it would have been without them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import tiny_model_dir
from unsloth_core.data.synthetic import fact_rows, write_jsonl
from unsloth_core.finetune import finetune
from unsloth_core.lora import LoRAConfig
from unsloth_core.trainer import TrainArgs, TrainerCallbacks

LORA = LoRAConfig(r=4, lora_alpha=8)


class Saved(TrainerCallbacks):
    def __init__(self) -> None:
        self.samples: dict[int, Any] = {}

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
        self.samples[step] = metrics.get("samples")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("probes")
    return (tiny_model_dir(root / "model", std=0.05), write_jsonl(root / "train.jsonl", fact_rows(8, seed=1)),
            write_jsonl(root / "valid.jsonl", fact_rows(4, seed=2)))


def run(out: Path, files: tuple[Path, Path, Path], **kw: Any) -> tuple[Saved, dict[str, torch.Tensor]]:
    model, train, valid = files
    args = TrainArgs(output_dir=str(out), micro_batch_size=2, max_steps=4, save_steps=2, learning_rate=5e-3,
                     max_seq_length=128, seed=7, probe_max_tokens=6, **kw)
    saved = Saved()
    _, final = finetune(model, train, args, LORA, valid, saved)
    return saved, load_file(str(final / "adapter_model.safetensors"))


def test_held_out_prompts_are_answered_at_each_checkpoint_without_changing_training(
        tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    probed, adapter = run(tmp_path / "a", files)
    assert sorted(probed.samples) == [2, 4]
    first = probed.samples[2]
    rows = fact_rows(4, seed=2)
    assert len(first) == 3 and first[0]["prompt"] == rows[0]["messages"][:-1]  # up to the assistant's reply
    assert all(isinstance(s["output"], str) and s["finish_reason"] in ("stop", "length") for s in first)
    quiet, plain = run(tmp_path / "b", files, n_probes=0)
    assert quiet.samples == {2: None, 4: None}
    assert plain.keys() == adapter.keys() and all(torch.equal(plain[k], adapter[k]) for k in adapter)


def test_the_users_probe_prompts(tmp_path: Path, files: tuple[Path, Path, Path]) -> None:
    probed, _ = run(tmp_path / "c", files, probe_prompts=["Once upon", [{"role": "user", "content": "Hi"}]])
    assert [s["prompt"] for s in probed.samples[4]] == ["Once upon", [{"role": "user", "content": "Hi"}]]


def test_a_held_out_tool_conversation_is_probed_with_its_tools() -> None:
    """A chat row offering tools is asked with them (rendered as serving renders them), and the sample names them."""
    import json

    from tests.helpers import make_tiny_tokenizer, tiny_model
    from unsloth_core.data.formats import parse_row
    from unsloth_core.probes import example_prompts, make_probes
    from unsloth_core.tool_calls import HERMES, prompt_messages

    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": json.dumps({})}}
    row = {"messages": [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": None,
                                                                "tool_calls": [call]}], "tools": [tool]}
    tok = make_tiny_tokenizer()
    prompts = example_prompts([parse_row(row)[1]])
    assert prompts == [{"messages": row["messages"][:1], "tools": [tool]}]
    probes = make_probes(prompts, tok, max_new_tokens=4)
    assert probes is not None
    served, _ = prompt_messages(row["messages"][:1], [tool], HERMES, False)
    assert probes.ids == [tok.encode(tok.render_chat(served, add_generation_prompt=True), add_special_tokens=False)]
    [sample] = probes.run(tiny_model(seed=1, max_position_embeddings=2048))
    assert sample["prompt"] == row["messages"][:1] and sample["tools"] == ["get_time"]
