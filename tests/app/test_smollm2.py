"""The real default base model (SmolLM2-135M-Instruct, imported from its GGUF) served by the API: one pointed check
that the chat template, tokenizer and generation come together into a right answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from app.core.config import load_settings
from app.main import create_app
from tests.app.conftest import ServerThread

MODEL = "smollm2-135m-instruct"


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
