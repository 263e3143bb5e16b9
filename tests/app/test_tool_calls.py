"""Tool calls on `/v1/chat/completions` through the openai SDK, on a tiny random model with a ChatML template that
has no tools section (so tools are offered in the hermes convention's system block): a forced call is a valid call
(the grammar holds even a random model to it), streamed calls assemble to the same calls, a named function, `none`,
a tool-result turn, and the refusals that name the field (a template with no convention we read, malformed tools).

The models are served by one app of this module, on SQLite (tool calls touch no database): the shared tiny model's
512-token context cannot hold a tools block spelt one byte a token, so this one has 4096 positions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.app.conftest import served_app, write_tiny_tokenizer
from tests.conftest import tiny_model
from unsloth_core.chat_templates import CHAT_FORMATS

TINY = "tiny-tools"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 6}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["utc_offset"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _model_dir(root: Path, chat_template: str | None = None) -> Path:
    from unsloth_core.checkpoint import save_model

    write_tiny_tokenizer(root / "tokenizer")
    if chat_template is not None:
        (root / "tokenizer" / "chat_template.jinja").write_text(chat_template)
    model = tiny_model(seed=3, vocab_size=272, bos_token_id=None, eos_token_id=258, pad_token_id=256,
                       max_position_embeddings=4096)
    return save_model(model, root / "model", tokenizer_dir=root / "tokenizer")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp("tools")
    models = root / "data" / "models"
    models.mkdir(parents=True)
    (models / TINY).symlink_to(_model_dir(root / "chatml"), target_is_directory=True)
    zephyr = _model_dir(root / "zephyr", CHAT_FORMATS["zephyr"].template)
    (models / "tiny-zephyr").symlink_to(zephyr, target_is_directory=True)
    with served_app("sqlite", "tools", {"data_dir": root / "data", "api_key": "sk-test-tools"}) as (_, _, url, key, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("model", TINY)
    kwargs.setdefault("messages", ASK)
    kwargs.setdefault("max_tokens", 300)
    return client.chat.completions.create(**kwargs)


def valid_calls(message: Any) -> list[tuple[str, str]]:
    """(name, arguments) of each call, after checking its shape and its arguments against its function's schema."""
    out = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
        out.append((call.function.name, call.function.arguments))
    return out


def assembled(chunks: list[Any]) -> tuple[str, dict[int, dict[str, str]], list[str | None]]:
    """(content, calls by index as OpenAI's stream builds them up, finish reasons) of a streamed choice 0."""
    content, calls, finishes = "", {}, []
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for piece in choice.delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                if piece.id:
                    assert not call["id"] and piece.type == "function" and piece.function.name  # the first piece
                    call["id"], call["name"] = piece.id, piece.function.name
                call["arguments"] += piece.function.arguments or ""
            finishes += [choice.finish_reason] if choice.finish_reason else []
    return content, calls, finishes


def test_required_gives_valid_calls_whole_and_streamed(client: openai.OpenAI) -> None:
    """A random model rarely ends after a call on its own, so with parallel calls it mostly runs to max_tokens: the
    calls it completed are still calls (finish_reason length, the cut one left as text)."""
    for seed, parallel in ((1, True), (3, False)):
        kwargs = dict(tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, parallel_tool_calls=parallel,
                      max_tokens=160)
        whole = chat(client, **kwargs).choices[0]
        calls = valid_calls(whole.message)
        assert calls and (parallel or len(calls) == 1)
        if whole.finish_reason == "tool_calls":
            assert whole.message.content is None
        else:
            assert parallel and whole.finish_reason == "length"
        content, streamed, finishes = assembled(list(chat(client, stream=True, **kwargs)))
        assert content == (whole.message.content or "") and finishes == [whole.finish_reason]
        assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == calls
        assert all(c["id"].startswith("call_") for c in streamed.values())


def test_the_sdk_stream_helper_and_one_call_only(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model=TINY, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
                                        parallel_tool_calls=False, temperature=1.0, seed=4, max_tokens=300) as stream:
        final = stream.get_final_completion()
    assert len(valid_calls(final.choices[0].message)) == 1 and final.choices[0].finish_reason == "tool_calls"


def test_a_named_function_is_called(client: openai.OpenAI) -> None:
    for seed in (1, 2):
        out = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                   temperature=1.0, seed=seed, n=2)
        for choice in out.choices:
            calls = valid_calls(choice.message)
            assert [name for name, _ in calls] == ["get_time"] and choice.finish_reason == "tool_calls"


def test_logprobs_ride_along_with_streamed_calls(client: openai.OpenAI) -> None:
    kwargs = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  temperature=1.0, seed=5, logprobs=True, top_logprobs=1)
    whole = chat(client, **kwargs)
    tokens = [t.token for t in whole.choices[0].logprobs.content]
    assert len(tokens) == whole.usage.completion_tokens
    chunks = list(chat(client, stream=True, **kwargs))
    assert [t.token for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.content] == tokens


def test_tool_choice_none_offers_no_tools(client: openai.OpenAI) -> None:
    plain = chat(client, max_tokens=4, temperature=0)
    none = chat(client, tools=TOOLS, tool_choice="none", max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens  # no tools block in the prompt
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("length", "stop")
    offered = chat(client, tools=TOOLS, max_tokens=4, temperature=0)  # auto
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 100


def test_a_tool_result_turn_renders(client: openai.OpenAI) -> None:
    first = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 temperature=1.0, seed=7)
    message = first.choices[0].message
    assert message.tool_calls
    turn = [*ASK, message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"celsius": 21}'}]
    follow = chat(client, messages=turn, tools=TOOLS, max_tokens=4, temperature=0)
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens + len(message.tool_calls[0].function.arguments)
    none = chat(client, messages=turn, tools=TOOLS, tool_choice="none", max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens < follow.usage.prompt_tokens  # history rendered, tools block not

    bad = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
           {"role": "tool", "tool_call_id": "call_x", "content": "21"}]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=bad, tools=TOOLS)
    assert e.value.body["param"] == "messages[1].tool_calls[0].function.arguments"  # type: ignore[index]


@pytest.mark.parametrize(("tools", "choice", "param"), [
    ([{"type": "function", "function": {"parameters": {"type": "object"}}}], None, "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": "object"}}], None, "tools[0].function.parameters"),
    ([{"type": "function", "function": {"name": "f g"}}], None, "tools[0].function.name"),
    ([{"type": "custom", "function": {"name": "f"}}], None, "tools[0].type"),
    ([WEATHER, WEATHER], None, "tools"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    (None, "required", "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    ([WEATHER, {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "dependentSchemas": {"a": {}}}}}], "required", "tools[1].function.parameters"),
])
def test_malformed_tools_are_refused_by_name(client: openai.OpenAI, tools: Any, choice: Any, param: str) -> None:
    body: dict[str, Any] = {"tools": tools} if tools is not None else {}
    if choice is not None:
        body["tool_choice"] = choice
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=2, extra_body=body)
    assert e.value.body["param"] == param, e.value.body  # type: ignore[index]


def test_tools_for_a_template_with_no_known_convention_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, model="tiny-zephyr", tools=TOOLS)
    assert e.value.body["param"] == "tools" and e.value.body["code"] == "unsupported_tools"  # type: ignore[index]
    out = chat(client, model="tiny-zephyr", tools=TOOLS, tool_choice="none", max_tokens=2)
    assert out.choices[0].message.tool_calls is None


# ---- POST /v1/tool_call_checks ----

def tool_row(city: str) -> dict[str, Any]:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city, "unit": "celsius"})}}
    return {"messages": [{"role": "user", "content": f"Weather in {city}?"},
                         {"role": "assistant", "content": None, "tool_calls": [call]}], "tools": TOOLS}


def tool_check(client: openai.OpenAI, **body: Any) -> httpx.Response:
    body.setdefault("model", TINY)
    body.setdefault("max_tokens", 24)
    return httpx.post(f"{client.base_url}tool_call_checks", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {client.api_key}"})


def test_a_tool_call_check_asks_each_tool_turn_as_served(client: openai.OpenAI) -> None:
    """The random model writes no calls: every asked turn is reported with its output and why it is not valid."""
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            tool_row("Paris"), tool_row("Oslo"), tool_row("Rome")]
    report = tool_check(client, conversations=rows, max_turns=2).json()
    assert report["object"] == "tool_call_check" and report["model"] == TINY
    assert (report["n_turns"], report["n_skipped"], report["valid_rate"], report["match_rate"]) == (2, 0, 0.0, 0.0)
    assert [t["conversation"] for t in report["turns"]] == [1, 2]
    for turn in report["turns"]:
        assert turn["expected"] == ["get_weather"] and isinstance(turn["output"], str)
        assert not turn["valid"] and turn["problems"] == ["no tool call"] and turn["tool_calls"] == []
    # the same rows from an uploaded file give the same report (greedy)
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    uploaded = client.files.create(file=("tools.jsonl", data), purpose="fine-tune")
    assert tool_check(client, file_id=uploaded.id, max_turns=2).json() == report


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    ({}, 400, "file_id", None),
    ({"file_id": "file-x", "conversations": [{}]}, 400, "file_id", None),
    ({"file_id": "file-missing"}, 404, "file_id", "file_not_found"),
    ({"conversations": [{"messages": [{"role": "user", "content": "hi"}]}]}, 400, "conversations", "no_tool_turns"),
    ({"conversations": [{**tool_row("Paris"), "messages": [{"role": "robot", "content": "hi"},
                                                          *tool_row("Paris")["messages"][1:]]}]},
     400, "conversations[0]", None),
    ({"conversations": [tool_row("Paris")], "model": "tiny-zephyr"}, 400, "tools", "unsupported_tools"),
    ({"conversations": [tool_row("Paris")], "model": "no-such-model"}, 404, "model", None),
    ({"conversations": [tool_row("Paris")], "max_turns": 0}, 400, None, None),
])
def test_a_tool_call_check_names_what_is_wrong(client: openai.OpenAI, body: dict[str, Any], status: int,
                                               param: str | None, code: str | None) -> None:
    answer = tool_check(client, **body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
