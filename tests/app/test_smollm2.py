"""The real default base model (SmolLM2-135M-Instruct, imported from its GGUF) served by the API: one pointed check
that the chat template, tokenizer and generation come together into a right answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from app.core.config import load_settings
from app.main import create_app
from tests.app.conftest import ServerThread

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def smol_client(smollm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    data_dir = tmp_path_factory.mktemp("data-smollm2")
    (data_dir / "models").mkdir()
    (data_dir / "models" / MODEL).symlink_to(smollm_dir, target_is_directory=True)
    app = create_app(load_settings(data_dir=data_dir, api_key="sk-test-smollm2"))
    try:
        with ServerThread(app) as server:
            yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="sk-test-smollm2",
                                max_retries=0, timeout=120)
    finally:
        app.state.ctx.close()


@pytest.mark.slow
def test_smollm2_answers_over_the_api(smol_client: openai.OpenAI) -> None:
    model = smol_client.models.retrieve(MODEL)
    assert model.model_extra["max_model_len"] == 8192  # type: ignore[index]
    stream = smol_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], temperature=0,
        max_tokens=32, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text and "<|im_end|>" not in text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 10


@pytest.mark.slow
def test_smollm2_tool_calls_parse(smol_client: openai.OpenAI) -> None:
    """SmolLM2's template has no tools section: the tools go in a hermes system block. Whether the 135M model calls
    on its own is its choice (it mostly answers in prose); a call it makes parses, and a required one validates."""
    ask = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    auto = smol_client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER],  # type: ignore[list-item]
                                               temperature=0, max_tokens=64).choices[0]
    for call in auto.message.tool_calls or []:
        assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    assert auto.message.tool_calls or "<tool_call>" not in (auto.message.content or "")
    forced = smol_client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER],  # type: ignore[list-item]
                                                 tool_choice="required", parallel_tool_calls=False, temperature=0,
                                                 max_tokens=64).choices[0]
    assert forced.finish_reason == "tool_calls" and forced.message.tool_calls and len(forced.message.tool_calls) == 1
    call = forced.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]
