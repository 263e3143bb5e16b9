"""Every input format parses into the normalised dataclasses; each malformed field gets its own code."""

from __future__ import annotations

from typing import Any

import pytest

from unsloth_core.data.examples import (
    ChatExample,
    CompletionExample,
    Message,
    PreferenceExample,
    RLExample,
    TextExample,
)
from unsloth_core.data.formats import RowError, detect_format, parse_row

USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}


def parse(row: Any) -> tuple[str, Any]:
    fmt, example = parse_row(row)
    return fmt.name, example


def test_text_and_prompt_completion() -> None:
    assert parse({"text": "Once upon a time"}) == ("text", TextExample("Once upon a time"))
    assert parse({"prompt": "2+2=", "completion": "4"}) == ("prompt_completion", CompletionExample("2+2=", "4"))
    # legacy OpenAI allowed an empty prompt
    assert parse({"prompt": "", "completion": "x"})[1] == CompletionExample("", "x")


def test_openai_chat_with_weights_tools_and_content_parts() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "draft", "weight": 0},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
            {"role": "assistant", "content": "It is 42.", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    name, example = parse(row)
    assert name == "chat" and isinstance(example, ChatExample)
    assert [m.role for m in example.messages] == ["system", "user", "assistant", "assistant", "tool", "assistant"]
    assert [m.trainable for m in example.messages] == [False, False, False, True, False, True]
    assert example.messages[1].content == "Hi there"
    assert example.messages[3].content == "" and example.messages[3].extra["tool_calls"][0]["id"] == "c1"
    assert example.messages[4].to_template() == {"role": "tool", "content": "42", "tool_call_id": "c1"}
    assert example.tools == row["tools"]


def test_alpaca_becomes_a_chat() -> None:
    name, example = parse({"instruction": "Translate", "input": "chat", "output": "cat", "system": "S"})
    assert name == "alpaca"
    assert example == ChatExample((Message("system", "S"), Message("user", "Translate\n\nchat"),
                                   Message("assistant", "cat", trainable=True)))
    # no input (or an empty one): the instruction alone; a pre-rendered `text` column does not make it `text`
    _, example = parse({"instruction": "Say hi", "input": "", "output": "hi", "text": "### Instruction: ..."})
    assert example.messages[0] == Message("user", "Say hi")


def test_sharegpt_roles_and_aliases() -> None:
    name, example = parse({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                             {"from": "gpt", "value": "A"}, {"from": "user", "value": "Q2"},
                                             {"from": "assistant", "value": "A2"}]})
    assert name == "sharegpt"
    assert [(m.role, m.content, m.trainable) for m in example.messages] == [
        ("system", "S", False), ("user", "Q", False), ("assistant", "A", True), ("user", "Q2", False),
        ("assistant", "A2", True)]
    # role/content keys under `conversations` are read too
    _, example = parse({"conversations": [USER, ASSISTANT]})
    assert [m.role for m in example.messages] == ["user", "assistant"]


def test_openai_dpo() -> None:
    name, example = parse({"input": {"messages": [{"role": "system", "content": "S"}, USER], "tools": []},
                           "preferred_output": [{"role": "assistant", "content": "good"}],
                           "non_preferred_output": [{"role": "assistant", "content": "bad"}]})
    assert name == "preference" and isinstance(example, PreferenceExample)
    assert [m.role for m in example.prompt] == ["system", "user"]
    assert (example.chosen.content, example.rejected.content) == ("good", "bad")
    assert example.chosen.trainable and example.chosen.role == "assistant"


@pytest.mark.parametrize("chosen,rejected", [
    ("good", "bad"),
    ([{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]),
    # the conversational style repeats the prompt in each reply
    ([USER, {"role": "assistant", "content": "good"}], [USER, {"role": "assistant", "content": "bad"}]),
])
def test_chosen_rejected(chosen: Any, rejected: Any) -> None:
    prompt = [USER] if isinstance(chosen, list) else "Hi"
    name, example = parse({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    assert name == "chosen_rejected"
    assert example.prompt == (Message("user", "Hi"),)
    assert (example.chosen, example.rejected) == (Message("assistant", "good", True), Message("assistant", "bad", True))


@pytest.mark.parametrize("row,code", [
    ("just a string", "not_an_object"),
    ({"foo": 1}, "unknown_format"),
    ({"instruction": "x"}, "missing_field"),
    ({"preferred_output": [], "non_preferred_output": []}, "missing_field"),
    ({"chosen": "a", "rejected": "b"}, "missing_field"),
    ({"text": ""}, "empty_field"),
    ({"text": 3}, "invalid_content_type"),
    ({"prompt": "p", "completion": "  "}, "empty_field"),
    ({"messages": "hi"}, "missing_messages"),
    ({"messages": []}, "empty_messages"),
    ({"messages": [USER, ["assistant", "x"]]}, "invalid_message"),
    ({"messages": [{"content": "x"}]}, "invalid_message"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unrecognized_role"),
    ({"messages": [{"role": "function", "content": "x"}]}, "unrecognized_role"),
    ({"messages": [{"role": "user"}, ASSISTANT]}, "missing_content"),
    ({"messages": [{"role": "user", "content": {"text": "x"}}, ASSISTANT]}, "invalid_content_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, ASSISTANT]}, "invalid_content_type"),
    ({"messages": [USER, {**ASSISTANT, "weight": 0}]}, "no_assistant_message"),
    ({"messages": [USER, {**ASSISTANT, "weight": 0.5}]}, "invalid_weight"),
    ({"messages": [USER, {**ASSISTANT, "weight": True}]}, "invalid_weight"),
    ({"messages": [{**USER, "weight": 1}, ASSISTANT]}, "invalid_weight"),
    ({"messages": [USER, ASSISTANT], "tools": "none"}, "invalid_field_type"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "unrecognized_role"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "missing_content"),
    ({"input": [USER], "preferred_output": [ASSISTANT], "non_preferred_output": [ASSISTANT]}, "invalid_preference"),
    ({"input": {}, "preferred_output": [ASSISTANT], "non_preferred_output": [ASSISTANT]}, "missing_messages"),
    ({"input": {"messages": [USER, ASSISTANT]}, "preferred_output": [{**ASSISTANT, "content": "a"}],
      "non_preferred_output": [ASSISTANT]}, "invalid_preference"),
    ({"input": {"messages": [USER]}, "preferred_output": [ASSISTANT, ASSISTANT],
      "non_preferred_output": [ASSISTANT]}, "invalid_preference"),
    ({"input": {"messages": [USER]}, "preferred_output": [USER], "non_preferred_output": [ASSISTANT]},
     "invalid_preference"),
    ({"input": {"messages": [USER]}, "preferred_output": [ASSISTANT], "non_preferred_output": [ASSISTANT]},
     "invalid_preference"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "invalid_preference"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "empty_field"),
    ({"prompt": [USER], "chosen": [USER], "rejected": "b"}, "invalid_preference"),
])
def test_row_errors(row: Any, code: str) -> None:
    with pytest.raises(RowError) as info:
        parse_row(row)
    assert info.value.code == code
    assert info.value.message  # every error says something a person can act on


def test_error_messages_name_the_field() -> None:
    with pytest.raises(RowError, match=r"`messages\[1\]\.weight` is 2"):
        parse_row({"messages": [USER, {**ASSISTANT, "weight": 2}]})
    with pytest.raises(RowError, match=r"`messages\[0\]\.role` is 'bot'; use one of system, user, assistant, tool"):
        parse_row({"messages": [{"role": "bot", "content": "x"}]})


def test_reinforcement_prompts() -> None:
    # OpenAI's RFT row: messages ending with the turn the model answers (developer is a system prompt), plus the
    # fields the grader reads.
    row = {"messages": [{"role": "developer", "content": "Be brief."}, USER], "answer": "4", "tools": [{"x": 1}]}
    name, example = parse(row)
    assert name == "rl_messages"
    assert example == RLExample((Message("system", "Be brief."), Message("user", "Hi")),
                                {"answer": "4", "tools": [{"x": 1}]}, [{"x": 1}])
    assert parse({"prompt": "2+2=", "answer": "4"}) == ("rl_prompt", RLExample("2+2=", {"answer": "4"}))
    assert parse({"prompt": [USER]})[1].prompt == (Message("user", "Hi"),)
    # read for an RL job, a row with an assistant turn or a `completion` field is still a prompt
    assert detect_format({"messages": [USER, ASSISTANT, USER]}, "rl").name == "rl_messages"
    assert detect_format({"prompt": "q", "completion": "ref"}, "rl").name == "rl_prompt"
    assert detect_format({"prompt": "q", "completion": "ref"}).name == "prompt_completion"
    assert detect_format({"messages": [USER, ASSISTANT]}).name == "chat"
    assert detect_format({"messages": [USER, ASSISTANT, USER]}).name == "rl_messages"  # history, then the turn


@pytest.mark.parametrize("row", [{"messages": [USER, ASSISTANT]}, {"prompt": [USER, ASSISTANT]}])
def test_a_reinforcement_prompt_cannot_end_with_the_reply(row: dict[str, Any]) -> None:
    with pytest.raises(RowError) as info:
        detect_format(row, "rl").parse(row)
    assert info.value.code == "invalid_prompt" and "ends with an assistant message" in info.value.message
