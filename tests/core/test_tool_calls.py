"""Tool calls in a template's convention: which convention a template follows, the prompt a template without a
tools section gets (the text Qwen 2.5's own template writes), replies parsed whole and streamed (cut anywhere, the
same content and calls), and the grammar that makes even a random model's reply a call whose arguments validate."""

from __future__ import annotations

import json
import random
from typing import Any

import jsonschema
import pytest

from tests.helpers import CHATML, make_llama3_like_tokenizer, make_tiny_tokenizer, tiny_model
from tests.helpers import LLAMA3 as LLAMA3_TEMPLATE
from unsloth_core.chat_templates import CHAT_FORMATS
from unsloth_core.constrained import check
from unsloth_core.generate import Generator
from unsloth_core.model import Llama
from unsloth_core.sampling import SamplingParams
from unsloth_core.tokenizer import Tokenizer
from unsloth_core.tool_calls import (
    HERMES,
    LLAMA3,
    Call,
    Content,
    Convention,
    ToolCall,
    ToolCallError,
    detect_convention,
    parse_tool_calls,
    prompt_messages,
    renders_tools,
    tool_call_constraint,
    tool_call_parser,
)

# A ChatML template that renders tools itself, as Qwen 2.5's does (the same text, written out here).
QWEN_STYLE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"utc_offset": {
        "type": "integer", "minimum": -12, "maximum": 14}}, "required": ["utc_offset"], "additionalProperties": False}}}
NAMES = {"get_weather", "get_time"}

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21"},
    {"role": "tool", "tool_call_id": "call_2", "content": "25"},
    {"role": "assistant", "content": "Paris 21, Rome 25."},
    {"role": "user", "content": "And the time in Tokyo?"},
]


# ---- which convention ----


@pytest.mark.parametrize(("template", "expected"), [
    (CHATML, "hermes"), (QWEN_STYLE, "hermes"), (CHAT_FORMATS["chatml"].template, "hermes"),
    (LLAMA3_TEMPLATE, "llama3"), (CHAT_FORMATS["llama-3.1"].template, "llama3"),
    (CHAT_FORMATS["llama-3"].template, "llama3"),
    (CHAT_FORMATS["zephyr"].template, None), (CHAT_FORMATS["alpaca"].template, None),
    (CHAT_FORMATS["mistral"].template, None), (CHAT_FORMATS["gemma"].template, None), (None, None),
])
def test_the_convention_is_read_from_the_template(template: str | None, expected: str | None) -> None:
    convention = detect_convention(template)
    assert (convention.name if convention else None) == expected


def test_templates_that_render_tools_are_told_apart() -> None:
    assert renders_tools(make_tiny_tokenizer(QWEN_STYLE))
    assert not renders_tools(make_tiny_tokenizer(CHATML))  # writes neither tools nor calls
    llama31 = make_tiny_tokenizer(CHAT_FORMATS["llama-3.1"].template, "<|begin_of_text|>", "<|eot_id|>")
    assert not renders_tools(llama31)  # refuses tools with raise_exception


# ---- the prompt ----


def test_a_chatml_template_without_tools_renders_what_qwen_s_own_template_writes() -> None:
    plain, native = make_tiny_tokenizer(CHATML), make_tiny_tokenizer(QWEN_STYLE)
    tools = [WEATHER, TIME]
    ours = plain.render_chat(*_inputs(CONVERSATION, tools, HERMES, native=False), add_generation_prompt=True)
    messages, offered = prompt_messages(CONVERSATION, tools, HERMES, native=True)
    theirs = native.render_chat(messages, add_generation_prompt=True, tools=offered)
    assert ours == theirs
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}\n</tool_call>' \
        in ours and "<tool_response>\n21\n</tool_response>\n<tool_response>\n25\n</tool_response>" in ours


def _inputs(messages: list[dict[str, Any]], tools: list[dict[str, Any]], convention: Convention,
            native: bool) -> tuple[list[dict[str, Any]]]:
    rendered, offered = prompt_messages(messages, tools, convention, native)
    assert offered is None  # written into the messages
    return (rendered,)


def test_a_native_template_gets_the_arguments_as_objects() -> None:
    messages, offered = prompt_messages(CONVERSATION, [WEATHER], HERMES, native=True)
    assert offered == [WEATHER] and messages[0] == CONVERSATION[0]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    assert messages[3] == CONVERSATION[3]


def test_llama3_calls_and_results_are_written_in_its_convention() -> None:
    tok = make_llama3_like_tokenizer()
    messages, _ = prompt_messages(CONVERSATION[1:], [WEATHER], LLAMA3, native=False)
    text = tok.render_chat(messages, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nGiven the following "
                           "functions")
    assert ('Checking.\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
            '{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}<|eot_id|>') in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n21<|eot_id|>" in text


@pytest.mark.parametrize(("arguments", "problem"), [('{"city": ', "not valid JSON"), ("[1]", "a JSON object")])
def test_arguments_that_are_not_an_object_are_named(arguments: str, problem: str) -> None:
    bad = [*CONVERSATION[:2], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}]
    with pytest.raises(ToolCallError, match=problem) as e:
        prompt_messages(bad, [WEATHER], HERMES, native=False)
    assert e.value.where == "messages[2].tool_calls[0].function.arguments"


# ---- parsing ----


def _call(city: str) -> str:
    return f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}", "unit": "celsius"}}}}\n</tool_call>'


def _weather(city: str) -> ToolCall:
    return ToolCall("get_weather", json.dumps({"city": city, "unit": "celsius"}))


HERMES_CASES = [
    ("Just text.", "Just text.", []),
    (_call("Paris"), "", [_weather("Paris")]),
    ("Let me look.\n" + _call("Paris") + "\n" + _call("Rome"), "Let me look.", [_weather("Paris"), _weather("Rome")]),
    ("Before.\n" + _call("Paris") + "\nAfter.", "Before.\nAfter.", [_weather("Paris")]),
    # malformed JSON, an unknown function, arguments that are no object: left as they are, as content
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),
    ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),
    ('<tool_call>\n{"name": "get_time", "arguments": 3}\n</tool_call>',
     '<tool_call>\n{"name": "get_time", "arguments": 3}\n</tool_call>', []),
    # arguments as JSON text, and a call the model never closed
    ('<tool_call>\n{"name": "get_time", "arguments": "{\\"utc_offset\\": 9}"}\n</tool_call>', "",
     [ToolCall("get_time", '{"utc_offset": 9}')]),
    ('<tool_call>\n{"name": "get_time", "arguments": {"utc_offset": 9}}', "", [ToolCall("get_time",
                                                                                        '{"utc_offset": 9}')]),
    ("Use a <tool> carefully, < or <tool_cal", "Use a <tool> carefully, < or <tool_cal", []),
]

LLAMA3_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", [_weather("Paris")]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [_weather("Paris")]),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {"utc_offset": 1}}', "",
     [_weather("Paris"), ToolCall("get_time", '{"utc_offset": 1}')]),
    ("It is sunny {probably}.", "It is sunny {probably}.", []),
    ('{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", "parameters": {"city": ', []),
    ('{"name": "get_weather", "parameters": {}} and more', '{"name": "get_weather", "parameters": {}} and more', []),
    ("  \n", "  \n", []),
]


@pytest.mark.parametrize(("convention", "text", "content", "calls"),
                         [(HERMES, *c) for c in HERMES_CASES] + [(LLAMA3, *c) for c in LLAMA3_CASES])
def test_replies_parse_into_content_and_calls(convention: Convention, text: str, content: str,
                                             calls: list[ToolCall]) -> None:
    assert parse_tool_calls(text, convention, NAMES) == (content, calls)


@pytest.mark.parametrize(("convention", "text"),
                         [(HERMES, c[0]) for c in HERMES_CASES] + [(LLAMA3, c[0]) for c in LLAMA3_CASES])
def test_a_streamed_reply_parses_as_the_whole_one_however_it_is_cut(convention: Convention, text: str) -> None:
    whole = parse_tool_calls(text, convention, NAMES)
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        parser = tool_call_parser(convention, NAMES)
        events = [e for p in pieces for e in parser.push(p)] + parser.finish()
        content = "".join(e.text for e in events if isinstance(e, Content))
        calls = [e.call for e in events if isinstance(e, Call)]
        assert (content, calls) == whole
        assert [e.index for e in events if isinstance(e, Call)] == list(range(len(calls)))


def test_text_before_a_call_streams_before_the_call_is_complete() -> None:
    parser = tool_call_parser(HERMES, NAMES)
    assert parser.push("Let me look. ") == [Content("Let me look.")]  # the space waits: a call may follow it
    assert parser.push("<tool_") == []  # may open a call
    assert parser.push('call>\n{"name": "get_time", "arguments": {"utc_offset"') == []
    assert parser.push(': 2}}\n</tool_call>') == [Call(0, ToolCall("get_time", '{"utc_offset": 2}'))]
    assert parser.push(" ") == [] and parser.finish() == []


def test_without_parallel_calls_only_the_first_is_a_call() -> None:
    text = _call("Paris") + "\n" + _call("Rome")
    content, calls = parse_tool_calls(text, HERMES, NAMES, parallel=False)
    assert calls == [_weather("Paris")] and content == _call("Rome")
    llama = '{"name": "get_time", "parameters": {"utc_offset": 1}}; {"name": "get_time", "parameters": {}}'
    content, calls = parse_tool_calls(llama, LLAMA3, NAMES, parallel=False)
    assert calls == [ToolCall("get_time", '{"utc_offset": 1}')] and content == '{"name": "get_time", "parameters": {}}'


# ---- the grammar: a forced call is a valid call, even from a random model ----


@pytest.fixture(scope="module")
def model() -> Llama:
    # Its EOS is the tokenizers' (<|im_end|>, <|eot_id|>: both 258): the grammar's view of a tokenizer is built once,
    # with the first EOS set it is given, so a model ending on another id could stop inside a string.
    return tiny_model(seed=3, std=0.3, eos_token_id=258, bos_token_id=None)


def _validate(call: ToolCall, tools: list[dict[str, Any]]) -> None:
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.name)
    jsonschema.validate(json.loads(call.arguments), schema)


@pytest.mark.parametrize("convention", [HERMES, LLAMA3], ids=["hermes", "llama3"])
@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "one"])
def test_a_forced_call_parses_and_validates(model: Llama, convention: Convention, parallel: bool) -> None:
    tok = make_tiny_tokenizer() if convention is HERMES else make_llama3_like_tokenizer()
    tools = [WEATHER, TIME]
    constraint = tool_call_constraint(convention, tools, parallel)
    check(constraint, tok)
    gen = Generator(model, tok)
    for seed in range(6):
        params = SamplingParams(max_new_tokens=400, temperature=1.0, seed=seed, constraint=constraint)
        out = gen.generate(["What's the weather?"], params)[0]
        assert out.finish_reason == "stop", out.text
        content, calls = parse_tool_calls(out.text, convention, NAMES, parallel)
        assert content == "" and calls, out.text
        assert parallel or len(calls) == 1
        for call in calls:
            _validate(call, tools)


def test_a_named_function_is_the_one_called(model: Llama) -> None:
    tok = make_tiny_tokenizer()
    constraint = tool_call_constraint(HERMES, [TIME], parallel=False)
    out = Generator(model, tok).generate(["x"], SamplingParams(max_new_tokens=200, temperature=1.0, seed=1,
                                                               constraint=constraint))[0]
    content, calls = parse_tool_calls(out.text, HERMES, NAMES)
    assert content == "" and [c.name for c in calls] == ["get_time"]
    _validate(calls[0], [TIME])


def test_nested_definitions_of_the_parameters_resolve(model: Llama) -> None:
    """pydantic writes nested models as `$defs` with `#/$defs/...` references from the parameters' root."""
    parameters = {"$defs": {"Place": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}},
                                      "required": ["city"], "additionalProperties": False}},
                  "type": "object", "properties": {"place": {"$ref": "#/$defs/Place"}}, "required": ["place"],
                  "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "visit", "parameters": parameters}}
    tok = make_tiny_tokenizer()
    constraint = tool_call_constraint(HERMES, [tool], parallel=False)
    check(constraint, tok)
    out = Generator(model, tok).generate(["x"], SamplingParams(max_new_tokens=200, temperature=1.0, seed=2,
                                                               constraint=constraint))[0]
    _, calls = parse_tool_calls(out.text, HERMES, {"visit"})
    assert len(calls) == 1
    jsonschema.validate(json.loads(calls[0].arguments), parameters)


def test_a_call_or_an_answer_in_the_response_format(model: Llama) -> None:
    from unsloth_core.constrained import Constraint

    answer = Constraint.json_schema({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                     "additionalProperties": False})
    tok: Tokenizer = make_tiny_tokenizer()
    constraint = tool_call_constraint(HERMES, [TIME], parallel=False, answer=answer)
    check(constraint, tok)
    gen = Generator(model, tok)
    for seed in range(6):
        out = gen.generate(["x"], SamplingParams(max_new_tokens=200, temperature=1.0, seed=seed,
                                                 constraint=constraint))[0]
        content, calls = parse_tool_calls(out.text, HERMES, NAMES)
        assert calls or json.loads(content) in ({"ok": True}, {"ok": False}), out.text


# ---- training renders tool turns as serving does ----

TRAINING_ROW = {"messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]}], "tools": [WEATHER]}


@pytest.mark.parametrize("template", [CHATML, QWEN_STYLE], ids=["chatml-without-tools", "qwen-style"])
def test_a_training_row_renders_as_the_serving_prompt_plus_the_call(template: str) -> None:
    from unsloth_core.data.formats import parse_row
    from unsloth_core.data.sft import IGNORE_INDEX, tokenize_sft

    tok = make_tiny_tokenizer(template)
    _, example = parse_row(TRAINING_ROW)
    trained = tokenize_sft(example, tok, None)  # type: ignore[arg-type]
    prompt, tools = prompt_messages(TRAINING_ROW["messages"][:-1], [WEATHER], HERMES, renders_tools(tok))
    served = tok.render_chat(prompt, add_generation_prompt=True, **({"tools": tools} if tools else {}))
    reply = HERMES.call_text([_weather_call("Paris")]) + "<|im_end|>"
    assert tok.decode(trained.input_ids) == served + reply + "\n"
    assert tok.decode([t for t in trained.labels if t != IGNORE_INDEX]) == reply


def _weather_call(city: str) -> ToolCall:
    return ToolCall("get_weather", json.dumps({"city": city, "unit": "celsius"}))


CONVERSATION_ROW = {"messages": [
    *TRAINING_ROW["messages"],
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."}], "tools": [WEATHER]}


@pytest.mark.parametrize("template", [CHATML, QWEN_STYLE], ids=["chatml-without-tools", "qwen-style"])
def test_every_assistant_turn_of_a_tool_conversation_is_trained_as_served(template: str) -> None:
    """The tool's result and the answer after it: the row renders as serving renders the conversation up to the
    answer, plus the answer; both assistant turns (the call, the answer) carry the labels, the result none."""
    from unsloth_core.data.formats import parse_row
    from unsloth_core.data.sft import IGNORE_INDEX, tokenize_sft

    tok = make_tiny_tokenizer(template)
    _, example = parse_row(CONVERSATION_ROW)
    trained = tokenize_sft(example, tok, None)  # type: ignore[arg-type]
    prompt, tools = prompt_messages(CONVERSATION_ROW["messages"][:-1], [WEATHER], HERMES, renders_tools(tok))
    served = tok.render_chat(prompt, add_generation_prompt=True, **({"tools": tools} if tools else {}))
    assert tok.decode(trained.input_ids) == served + "It is 21 degrees.<|im_end|>\n"
    call = HERMES.call_text([_weather_call("Paris")]) + "<|im_end|>"
    assert tok.decode([t for t in trained.labels if t != IGNORE_INDEX]) == call + "It is 21 degrees.<|im_end|>"


def test_tools_for_a_template_that_cannot_write_them_are_a_data_error_naming_the_line(tmp_path: Any) -> None:
    """Zephyr's template has no tools section and follows no convention we write: training on the row would drop
    the tools and the call silently, so validation refuses the line."""
    from unsloth_core.data.validation import validate_file

    path = tmp_path / "train.jsonl"
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(plain) + "\n" + json.dumps(TRAINING_ROW) + "\n")
    report = validate_file(path, make_tiny_tokenizer(CHAT_FORMATS["zephyr"].template), purpose="sft")
    assert [(e.line, e.code) for e in report.errors] == [(2, "template_error")]
    assert "tools" in report.errors[0].message and "dropped" in report.errors[0].message


def test_an_rl_prompt_offers_its_row_s_tools_as_serving_does() -> None:
    from unsloth_core.rl.prompts import prompt_example, render

    tok = make_tiny_tokenizer(CHATML)
    row = {"messages": TRAINING_ROW["messages"][:-1], "tools": [WEATHER], "answer": "Paris"}
    prompt, _ = prompt_messages(row["messages"], [WEATHER], HERMES, False)
    assert render(prompt_example(row), tok) == tok.encode(tok.render_chat(prompt, add_generation_prompt=True),
                                                          add_special_tokens=False)
    assert "get_weather" in tok.decode(render(prompt_example(row), tok))


def test_the_sft_trainer_renders_a_messages_row_s_tools_and_calls() -> None:
    """SFTTrainer's `messages` column with `tools`: the text holds the tools block and the call as serving writes
    them (before, the ChatML template dropped both)."""
    from unsloth_core.sft_trainer import SFTConfig, _Preparer

    tok = make_tiny_tokenizer(CHATML)
    text, plain = _Preparer(tok, SFTConfig(output_dir="unused"), 64, None).text(TRAINING_ROW)
    prompt, _ = prompt_messages(TRAINING_ROW["messages"], [WEATHER], HERMES, False)
    assert (text, plain) == (tok.render_chat(prompt), False)
    assert "<tools>" in text and HERMES.call_text([_weather_call("Paris")]) in text
