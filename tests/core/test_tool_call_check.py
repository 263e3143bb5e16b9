"""The tool-call check: replies judged against the offered functions' schemas, turns read from data files, and the
check run at each checkpoint beside the figure of the model training started from, leaving training as it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import make_llama3_like_tokenizer, make_tiny_tokenizer, tiny_model, tiny_model_dir
from unsloth_core.data.synthetic import write_jsonl
from unsloth_core.finetune import finetune
from unsloth_core.lora import LoRAConfig
from unsloth_core.tool_call_check import ToolTurn, check_reply, file_tool_turns, tool_call_check, tool_turns
from unsloth_core.tool_calls import HERMES, LLAMA3, ToolCall
from unsloth_core.trainer import TrainArgs, TrainerCallbacks

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _row(city: str) -> dict[str, Any]:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    return {"messages": [{"role": "user", "content": f"Weather in {city}?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "21"},
                         {"role": "assistant", "content": "21 degrees."}], "tools": [WEATHER, TIME]}


TURN = ToolTurn([{"role": "user", "content": "Weather in Paris?"}], [WEATHER, TIME], ["get_weather"])


def _hermes(name: str, arguments: dict[str, Any]) -> str:
    return HERMES.call_text([ToolCall(name, json.dumps(arguments))])


@pytest.mark.parametrize(("reply", "valid", "matched", "problem"), [
    (_hermes("get_weather", {"city": "Paris"}), True, True, None),
    ("Let me look.\n" + _hermes("get_weather", {"city": "Paris", "unit": "celsius"}), True, True, None),
    (_hermes("get_time", {}), True, False, None),  # a valid call, not the one the data made
    (_hermes("get_weather", {"town": "Paris"}), False, False, "arguments: 'city' is a required property"),
    (_hermes("get_weather", {"city": "Paris", "unit": "kelvin"}), False, False, "arguments['unit']: 'kelvin' is not"),
    (_hermes("get_stock", {}), False, False, "'get_stock' is not an offered function"),
    ("It is sunny in Paris.", False, False, "no tool call"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', False, False, "no tool call"),
])
def test_a_reply_is_valid_when_every_call_validates_against_its_schema(reply: str, valid: bool, matched: bool,
                                                                         problem: str | None) -> None:
    result = check_reply(reply, TURN, make_tiny_tokenizer())
    assert (result.valid, result.matched) == (valid, matched)
    if problem is not None:
        assert any(problem in p for p in result.problems), result.problems


def test_llama3_replies_are_read_in_their_convention() -> None:
    reply = LLAMA3.call_text([ToolCall("get_weather", json.dumps({"city": "Oslo"}))])
    result = check_reply(reply, TURN, make_llama3_like_tokenizer())
    assert result.valid and result.matched and result.calls == [ToolCall("get_weather", '{"city": "Oslo"}')]


def test_turns_are_the_tool_calling_assistant_turns_of_rows_with_tools() -> None:
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    turns = tool_turns([plain, _row("Paris"), {"prompt": "x", "completion": "y"}, _row("Oslo")])
    assert [t.messages for t in turns] == [_row("Paris")["messages"][:1], _row("Oslo")["messages"][:1]]
    assert all(t.expected == ["get_weather"] and t.tools == [WEATHER, TIME] for t in turns)
    assert len(tool_turns([_row(str(i)) for i in range(5)], n=3)) == 3


def test_turns_come_from_the_validation_file_first(tmp_path: Path) -> None:
    valid = write_jsonl(tmp_path / "valid.jsonl", [_row("Paris")])
    train = write_jsonl(tmp_path / "train.jsonl", [_row("Oslo"), _row("Rome")])
    cities = [t.messages[0]["content"] for t in file_tool_turns([valid, None, train], 2)]
    assert cities == ["Weather in Paris?", "Weather in Oslo?"]


def test_the_check_answers_greedily_and_leaves_the_model_as_it_was() -> None:
    model = tiny_model(seed=3, max_position_embeddings=2048)
    model.train()
    check = tool_call_check([TURN, TURN], make_tiny_tokenizer(), max_new_tokens=8)
    assert check is not None
    first, second = check.report(model), check.report(model)
    assert first.to_dict() == second.to_dict() and first.to_dict()["n_turns"] == 2
    assert set(check.run(model)) == {"eval_tool_calls/valid", "eval_tool_calls/matched"}
    assert model.training
    short = tool_call_check([TURN], make_tiny_tokenizer(), max_new_tokens=8, max_prompt_tokens=100)
    assert short is not None and short.report(model).n_skipped == 1 and short.run(model) == {}


def test_no_check_for_a_template_that_cannot_be_given_tools() -> None:
    from unsloth_core.chat_templates import CHAT_FORMATS

    assert tool_call_check([TURN], make_tiny_tokenizer(CHAT_FORMATS["zephyr"].template)) is None
    assert tool_call_check([], make_tiny_tokenizer()) is None


class Saved(TrainerCallbacks):
    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, Any]] = {}

    def on_checkpoint(self, path: Path, step: int, metrics: dict[str, Any]) -> None:
        self.metrics[step] = metrics


def test_each_checkpoint_carries_the_check_beside_the_start_s_figure_without_changing_training(
        tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path / "model", std=0.05, max_position_embeddings=2048)
    train = write_jsonl(tmp_path / "train.jsonl", [_row(c) for c in ("Paris", "Oslo", "Rome", "Lima")])

    def run(out: str, **kw: Any) -> tuple[Saved, dict[str, torch.Tensor]]:
        args = TrainArgs(output_dir=str(tmp_path / out), micro_batch_size=2, max_steps=4, save_steps=2,
                         learning_rate=5e-3, max_seq_length=1024, seed=7, n_probes=0, **kw)
        saved = Saved()
        _, final = finetune(model, train, args, LoRAConfig(r=4, lora_alpha=8), None, saved)
        return saved, load_file(str(final / "adapter_model.safetensors"))

    checked, adapter = run("a")
    assert sorted(checked.metrics) == [2, 4]
    for metrics in checked.metrics.values():
        keys = {"eval_tool_calls/valid", "eval_tool_calls/matched", "eval_tool_calls/start_valid",
                "eval_tool_calls/start_matched"}
        assert keys <= metrics.keys() and all(0.0 <= metrics[k] <= 1.0 for k in keys)
    unchecked, plain = run("b", tool_call_turns=0)
    assert not any(k.startswith("eval_tool_calls/") for m in unchecked.metrics.values() for k in m)
    assert plain.keys() == adapter.keys() and all(torch.equal(plain[k], adapter[k]) for k in adapter)


def test_a_schema_the_check_cannot_apply_is_named_not_raised() -> None:
    broken = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
    unresolved = {"type": "function", "function": {"name": "g", "parameters": {"$ref": "#/$defs/missing"}}}
    turn = ToolTurn([], [broken, unresolved], ["f"])
    for name in ("f", "g"):
        result = check_reply(_hermes(name, {}), turn, make_tiny_tokenizer())
        assert not result.valid and "not a JSON Schema this check can apply" in result.problems[0], result.problems
