"""`/v1/completions` and `/v1/chat/completions` through the openai SDK, on the tiny model: sampling knobs, logprobs,
streaming with usage, limits (context length, max_tokens, concurrency), client disconnects, and fine-tune and
checkpoint ids served as adapters on the shared base."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from app.services import keys
from tests.app.conftest import TINY, TINY_SLASHED, Backend, FineTune
from tests.helpers import wait_until
from unsloth_core.serving import BatchEngine

HI = [{"role": "user", "content": "Say something."}]


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("model", TINY)
    kwargs.setdefault("messages", HI)
    return client.chat.completions.create(**kwargs)


def greedy_text(client: openai.OpenAI, model: str = TINY, n_tokens: int = 12) -> str:
    return str(chat(client, model=model, max_tokens=n_tokens, temperature=0).choices[0].message.content)


def test_completion_from_the_base_model(backend: Backend) -> None:
    client = backend.client()
    out = client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.model == TINY and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert out.usage is not None and out.usage.prompt_tokens == len(b"Once upon a time")
    assert out.usage.completion_tokens <= 8 and out.usage.total_tokens == out.usage.prompt_tokens + \
        out.usage.completion_tokens
    batch = client.completions.create(model=TINY_SLASHED, prompt=["a", "bc"], max_tokens=3, n=2, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text  # greedy: the same prompt twice
    assert batch.usage is not None and batch.usage.prompt_tokens == 3


def test_chat_sampling_knobs(backend: Backend) -> None:
    client = backend.client()
    a = chat(client, max_completion_tokens=10, temperature=1.0, seed=42, n=3)
    b = chat(client, max_completion_tokens=10, temperature=1.0, seed=42, n=3)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert [c.index for c in a.choices] == [0, 1, 2] and a.choices[0].message.role == "assistant"
    assert a.usage is not None and a.usage.completion_tokens <= 30
    penalised = chat(client, max_tokens=10, temperature=0.7, top_p=0.9, presence_penalty=1.5, frequency_penalty=1.0,
                     seed=1, extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2})
    assert penalised.choices[0].finish_reason in ("length", "stop")
    developer = chat(client, messages=[{"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": [{"type": "text", "text": "Hello"}]}], max_tokens=2)
    assert developer.usage is not None and developer.usage.prompt_tokens > 0


def test_stop_sequences_cut_the_text(backend: Backend) -> None:
    client = backend.client()
    text = greedy_text(client, n_tokens=24)
    cut = next((i for i, ch in enumerate(text) if i >= 2 and ch.isprintable() and ch != "\ufffd"), None)
    if cut is None:
        pytest.skip("the random model produced no usable character")
    stop = text[cut]
    out = chat(client, max_tokens=24, temperature=0, stop=[stop])
    assert out.choices[0].message.content == text[: text.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_logprobs(backend: Backend) -> None:
    client = backend.client()
    out = client.completions.create(model=TINY, prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset or [])
    out = chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in content)


def test_chat_stream_with_usage_matches_the_whole_answer(backend: Backend) -> None:
    client = backend.client()
    whole = chat(client, max_tokens=12, temperature=0)
    chunks = list(chat(client, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].usage is None
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_streams_without_usage_and_with_n(backend: Backend) -> None:
    client = backend.client()
    chunks = list(chat(client, max_tokens=5, n=2, temperature=0, stream=True))
    assert all(c.usage is None for c in chunks)
    finished = {c.choices[0].index for c in chunks if c.choices[0].finish_reason}
    assert finished == {0, 1}
    whole = client.completions.create(model=TINY, prompt="xyz", max_tokens=6, temperature=0)
    stream = client.completions.create(model=TINY, prompt="xyz", max_tokens=6, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_context_and_token_limits(backend: Backend) -> None:
    client = backend.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="x" * 600, max_tokens=4)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "prompt")
    assert "maximum context length is 512 tokens" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=[{"role": "user", "content": "y" * 400}], max_completion_tokens=200)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "messages")
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=backend.settings.max_tokens + 1)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, functions=[{"name": "f"}])  # tools are served (test_tool_calls.py), deprecated functions not
    assert (e.value.param, e.value.code) == ("functions", "unsupported_parameter")
    with pytest.raises(openai.NotFoundError) as missing:
        chat(client, model="no-such-model")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    long_chat = chat(client, messages=[{"role": "user", "content": "z" * 450}])  # default: fill the context
    assert long_chat.usage is not None and long_chat.usage.total_tokens <= 512


def test_busy_server_answers_429_with_retry_after(backend: Backend) -> None:
    engine = backend.ctx.inference
    engine.in_flight += backend.settings.max_concurrent_generations  # as if that many were generating
    try:
        with pytest.raises(openai.RateLimitError) as e:
            chat(backend.client(), max_tokens=2)
        assert e.value.code == "rate_limit_exceeded" and e.value.response.headers["retry-after"] == "1"
    finally:
        engine.in_flight -= backend.settings.max_concurrent_generations
    assert chat(backend.client(), max_tokens=2).choices



def test_raw_stream_chunks_have_openais_fields(backend: Backend) -> None:
    """The SSE lines as OpenAI writes them (typed chunk models written with only the fields set): the chat role
    first, content deltas without a role, an empty delta with the finish reason, `usage: null` until the usage chunk
    when it is asked for, and no `usage` key at all when it is not."""
    import json

    def lines(path: str, body: dict[str, Any]) -> list[Any]:
        with httpx.stream("POST", backend.base_url + path, json={"model": TINY, "max_tokens": 4, "stream": True,
                                                                    **body},
                          headers={"Authorization": f"Bearer {backend.user_key}"}, timeout=60) as r:
            data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        return [json.loads(x) for x in data[:-1]]

    chat_chunks = lines("/v1/chat/completions", {"messages": HI, "stream_options": {"include_usage": True},
                                                 "ignore_eos": True})
    first, *middle, finish, usage = chat_chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    assert all(c["choices"][0]["delta"].keys() == {"content"} and c["choices"][0]["finish_reason"] is None
               for c in middle)
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert all(c["usage"] is None for c in chat_chunks[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    assert {c["object"] for c in chat_chunks} == {"chat.completion.chunk"}
    assert all(c.keys() == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
               for c in chat_chunks)
    text_chunks = lines("/v1/completions", {"prompt": "Once", "ignore_eos": True})
    assert all(c.keys() == {"id", "object", "created", "model", "system_fingerprint", "choices"} for c in text_chunks)
    assert all(c["choices"][0].keys() == {"index", "text", "logprobs", "finish_reason"} for c in text_chunks)
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_one_key_cannot_take_every_generation_slot(backend: Backend) -> None:
    """Issue 15: one key could hold all the generation slots while other keys got 429. Now a key holds at most its
    share (all but a quarter, UNSLOTH_MAX_GENERATIONS_PER_KEY to set it): past it, that key gets 429 while another
    key is still served."""
    from app.inference.engine import per_key_share

    greedy, other = backend.new_key("greedy"), backend.new_key("other")
    with backend.ctx.sessions() as session:
        greedy_id = keys.authenticate(session=session, token=greedy).id  # type: ignore[union-attr]
    engine = backend.ctx.inference
    share = engine.per_key_limit
    assert share == backend.settings.max_concurrent_generations  # 2 slots: none reserved (a quarter of 2 is 0)
    assert (per_key_share(32, None), per_key_share(4, None), per_key_share(32, 5)) == (24, 3, 5)
    engine.settings = backend.settings.model_copy(update={"max_concurrent_generations": 4})  # shares 3
    try:
        for _ in range(3):
            engine.acquire(greedy_id)  # as if the greedy key's three streams were running
        with pytest.raises(openai.RateLimitError) as e:
            chat(backend.client(greedy), max_tokens=2)
        assert "its share" in e.value.message and e.value.response.headers["retry-after"]
        assert chat(backend.client(other), max_tokens=2).choices  # the reserved slot serves another key
    finally:
        for _ in range(3):
            engine.release(greedy_id)
        engine.settings = backend.settings
    assert engine.in_flight == 0 and not engine.in_flight_by_key


def test_a_request_the_engine_cannot_fit_answers_503(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory for one request's cache or prefill is the server's capacity, not a bug: 503 with a message
    and Retry-After (not a 500), and the next request is served."""
    def out_of_memory(*_: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    with monkeypatch.context() as patch:
        patch.setattr(BatchEngine, "_prefill", out_of_memory)
        with pytest.raises(openai.InternalServerError) as e:
            chat(backend.client(), max_tokens=2)
    assert e.value.status_code == 503 and e.value.code == "insufficient_capacity"
    assert "out of memory for this request" in e.value.message and e.value.response.headers["retry-after"] == "5"
    assert chat(backend.client(), max_tokens=2).choices

def cancelled(backend: Backend) -> float:
    return float(backend.ctx.metrics.generations_cancelled._value.get())


def generated(backend: Backend) -> float:
    return sum(s.value for m in backend.ctx.metrics.generated_tokens.collect() for s in m.samples
               if s.name.endswith("_total"))


def test_a_client_that_leaves_stops_its_generation(backend: Backend) -> None:
    engine = backend.ctx.inference
    chat(backend.client(), model=TINY, max_tokens=1)  # loaded, so the requests below start generating at once
    before, tokens_before = cancelled(backend), generated(backend)
    stream = chat(backend.client(), max_tokens=450, stream=True, extra_body={"ignore_eos": True})
    first = next(iter(stream))  # the role chunk: the response has started
    assert first.choices[0].delta.role == "assistant"
    stream.close()
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{backend.base_url}/v1/chat/completions", timeout=0.2,
                   headers={"Authorization": f"Bearer {backend.user_key}"},
                   json={"model": TINY, "messages": HI, "max_tokens": 450, "ignore_eos": True})
    wait_until(lambda: engine.in_flight == 0, timeout=10)
    assert cancelled(backend) == before + 2
    assert generated(backend) - tokens_before < 2 * 450  # both stopped early


def test_fine_tune_and_checkpoints_answer(backend: Backend, fine_tune: FineTune) -> None:
    client = backend.client(fine_tune.key)
    base = greedy_text(client)
    answers = {}
    for model in (fine_tune.model, *fine_tune.checkpoints):
        out = chat(client, model=model, max_tokens=12, temperature=0)
        assert out.model == model and out.choices[0].finish_reason in ("length", "stop")
        answers[model] = out.choices[0].message.content
        completion = client.completions.create(model=model, prompt="Once", max_tokens=4)
        assert completion.usage is not None and completion.usage.prompt_tokens == 4
    assert any(a != base for a in answers.values())  # the adapters change the model
    served = backend.ctx.inference.cache.peek(fine_tune.model)
    base_served = backend.ctx.inference.cache.peek(TINY)
    assert served is not None and base_served is not None
    # one base in memory: the adapter's frozen weights are the base's own tensors
    assert served.engine.model.model.embed_tokens.weight.data_ptr() == \
        base_served.engine.model.model.embed_tokens.weight.data_ptr()


def test_stream_from_a_checkpoint(backend: Backend, fine_tune: FineTune) -> None:
    client = backend.client(fine_tune.key)
    chunks = list(chat(client, model=fine_tune.checkpoints[-1], max_tokens=6, temperature=0, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_the_base_and_its_fine_tunes_decode_in_one_engine(backend: Backend, fine_tune: FineTune) -> None:
    """Requests for the base, a fine-tune and its checkpoints at once share the base's engine (one batch) and each
    answers what it answers alone."""
    client = backend.client(fine_tune.key)
    models = [TINY, fine_tune.model, *fine_tune.checkpoints]
    alone = {m: greedy_text(client, model=m, n_tokens=16) for m in models}
    cache = backend.ctx.inference.cache
    engines = {id(served.engine) for m in models if (served := cache.peek(m)) is not None}
    assert len(engines) == 1
    served = cache.peek(fine_tune.model)
    assert served is not None and served.adapter == fine_tune.model
    results: dict[str, list[str]] = {m: [] for m in models}

    def ask(model: str) -> None:
        results[model].append(greedy_text(backend.client(fine_tune.key, max_retries=3), model=model, n_tokens=16))

    threads = [threading.Thread(target=ask, args=(m,)) for m in models for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {m: [alone[m]] * 2 for m in models}


def test_concurrent_requests_share_the_model_safely(backend: Backend) -> None:
    client = backend.client(max_retries=3)
    expected = greedy_text(client, n_tokens=8)
    results: list[str] = []

    def ask() -> None:
        results.append(greedy_text(client, n_tokens=8))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_engine_errors_a_client_can_act_on_are_503s() -> None:
    """What the engine ends a request with, as the API answers it: out of memory for this request, or its model's
    engine stopped under it (shutdown); anything else stays an internal error."""
    from app.core.errors import APIError
    from app.inference.engine import _api_error
    from unsloth_core.errors import CapacityError, EngineClosedError

    for error, code in ((CapacityError("x"), "insufficient_capacity"), (EngineClosedError("y"), "engine_closed")):
        api = _api_error(error)
        assert isinstance(api, APIError) and api.status == 503 and api.code == code
        assert api.headers["Retry-After"] == "5"
    other = RuntimeError("z")
    assert _api_error(other) is other


def test_a_new_base_is_loaded_after_the_oldest_one_is_unloaded(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """At the limit of loaded bases, loading first would hold one base too many at the peak (out of memory for big
    models): the least recently used one goes first."""
    from app.core.config import Settings
    from app.inference.cache import ModelCache
    from app.services.models import Servable
    from tests.helpers import tiny_model_dir
    from unsloth_core import checkpoint

    paths = {name: tiny_model_dir(tmp_path / name) for name in ("a", "b")}
    cache = ModelCache(Settings(data_dir=tmp_path, max_loaded_base_models=1, device="cpu"))
    loaded_when_loading: list[list[str]] = []
    real_load = checkpoint.load_model

    def load_model(*args: Any, **kwargs: Any) -> Any:
        loaded_when_loading.append(cache.loaded())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "load_model", load_model)
    for name, path in paths.items():
        served = cache.get(Servable(name, "base", name, path, None))
        assert served.engine.model is not None
    assert loaded_when_loading == [[], []] and cache.loaded() == ["b"]


@pytest.mark.parametrize(("setting", "compiled"), [("auto", False), ("on", True), ("off", False)])
def test_the_compile_decode_setting_reaches_the_engine(tmp_path: Path, setting: str, compiled: bool) -> None:
    """UNSLOTH_COMPILE_DECODE: auto compiles on a GPU only (this is a CPU), on and off force it."""
    from app.core.config import Settings
    from app.inference.cache import ModelCache
    from app.services.models import Servable
    from tests.helpers import tiny_model_dir

    cache = ModelCache(Settings(data_dir=tmp_path, device="cpu", compile_decode=setting))  # type: ignore[arg-type]
    served = cache.get(Servable("m", "base", "m", tiny_model_dir(tmp_path / "m"), None))
    assert served.engine.compile is compiled
    cache.evict(["m"])


def test_a_model_that_does_not_fit_in_memory_answers_503(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.inference.cache import ModelCache

    def out_of_memory(*_: Any, **__: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    backend.ctx.inference.cache.evict([TINY])  # the next request loads it again
    with monkeypatch.context() as patch:
        patch.setattr(ModelCache, "_load", out_of_memory)
        with pytest.raises(openai.InternalServerError) as e:
            chat(backend.client(), max_tokens=2)
    assert e.value.status_code == 503 and e.value.code == "insufficient_capacity"
    assert "not enough memory to load the model" in e.value.message
    assert chat(backend.client(), max_tokens=2).choices  # loads now


def test_a_bad_sampling_value_is_a_400_naming_it_and_its_neighbours_run_on(backend: Backend) -> None:
    """Every sampling field has the engine's bounds in the schema (or against the model): a bad value is a 400 that
    names the field, sent while another stream runs, and that stream's text is what it is alone."""
    client = backend.client()
    long = dict(max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    alone = chat(client, **long).choices[0].message.content
    stream = chat(client, stream=True, **long)
    chunks = iter(stream)
    text = [c.choices[0].delta.content or "" for c in [next(chunks)] if c.choices]
    vocab = 272  # the tiny model's
    bad: list[tuple[dict[str, Any], str]] = [
        ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"n": 2.5}, "n"), ({"n": "2"}, "n"),
        ({"extra_body": {"top_k": vocab + 1}}, "top_k"), ({"extra_body": {"top_k": 10**30}}, "top_k"),
        ({"logit_bias": {"9999": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"), ({"stop": [""]}, "stop[0]"), ({"stop": ["x" * 1001]}, "stop"),
        ({"max_tokens": 2**40}, "max_tokens"),
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, **{"max_tokens": 2, **kwargs})
        assert e.value.param is not None and e.value.param.startswith(param), (kwargs, e.value.param)
    raw = httpx.post(f"{backend.base_url}/v1/chat/completions", headers={"Authorization": f"Bearer {backend.user_key}",
                     "Content-Type": "application/json"}, timeout=30,
                     content=b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}], '
                             b'"temperature": Infinity}')  # Python's JSON reader takes it; the schema must not
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "temperature"
    text += [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(text) == alone
    # The edges are served: 64-bit seeds, an integral float where an integer is expected, top_k = the vocabulary.
    assert len(chat(client, max_tokens=2, n=2.0, seed=2**64 - 1).choices) == 2
    assert chat(client, max_tokens=2, seed=-(2**63), extra_body={"top_k": vocab}).choices


def test_logit_bias_steers_the_choice(backend: Backend, tiny_model_dir: Path) -> None:
    from unsloth_core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model_dir)
    client = backend.client()
    greedy = dict(model=TINY, prompt="ab", temperature=0, extra_body={"ignore_eos": True})
    forced = client.completions.create(max_tokens=4, logit_bias={str(tok.encode("b")[0]): 100}, **greedy)
    assert forced.choices[0].text == "bbbb"
    c = {str(tok.encode("c")[0]): 100}
    sampled = client.completions.create(max_tokens=4, temperature=1.0, seed=3, logit_bias=c,
                                        **{k: v for k, v in greedy.items() if k != "temperature"})
    assert sampled.choices[0].text == "cccc"  # sampled rows take the bias too


def test_an_oversized_prompt_is_refused_before_tokenizing(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    from unsloth_core.tokenizer import Tokenizer

    client = backend.client()
    chat(client, max_tokens=1)  # loaded
    calls: list[int] = []
    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, *a, **k: calls.append(len(text)) or
                        encode(self, text, *a, **k))
    big = "y" * (4 * 2**20)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt=big, max_tokens=1)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "prompt")
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=[{"role": "user", "content": big}], max_tokens=1)
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "messages")
    assert calls == []  # refused on the character count alone


def test_tokenizing_runs_off_the_event_loop(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one prompt is being tokenized (held here until the others are answered), /health and another key's
    completion are answered: the order shows the event loop was free, with no timing involved."""
    from unsloth_core.tokenizer import Tokenizer

    client = backend.client()
    chat(client, max_tokens=1)  # loaded
    entered, release = threading.Event(), threading.Event()
    encode = Tokenizer.encode

    def held_encode(self: Tokenizer, text: str, *args: Any, **kwargs: Any) -> list[int]:
        if text.startswith("HOLD"):
            entered.set()
            assert release.wait(timeout=60), "never released"
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", held_encode)
    order: list[str] = []

    def slow() -> None:
        client.completions.create(model=TINY, prompt="HOLD " + "z" * 200, max_tokens=1)
        order.append("held prompt")

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        assert entered.wait(timeout=30)
        assert httpx.get(f"{backend.base_url}/health", timeout=30).status_code == 200
        order.append("health")
        chat(backend.client(backend.other_key), max_tokens=1)
        order.append("other key")
    finally:
        release.set()
        thread.join(timeout=60)
    assert order == ["health", "other key", "held prompt"]


@pytest.mark.parametrize("stage", ["_prefill", "_step", "_emit"])
def test_a_fault_in_one_request_ends_it_alone_on_the_app(backend: Backend, monkeypatch: pytest.MonkeyPatch,
                                                         stage: str) -> None:
    """A fault injected into one request (at prefill, the batched decode step, or its output) answers it with a
    500 envelope; the stream running beside it finishes with the text it has alone, and the server serves on."""
    marked = [77, 77, 77]
    client = backend.client()
    long = dict(max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    alone = chat(client, **long).choices[0].message.content
    original = getattr(BatchEngine, stage)

    def faulty(self: BatchEngine, first: Any, *args: Any) -> Any:
        requests = first if isinstance(first, list) else [first]
        if any(r.prompt == marked for r in requests):
            raise RuntimeError(f"injected at {stage}")
        return original(self, first, *args)

    monkeypatch.setattr(BatchEngine, stage, faulty)
    chunks = iter(chat(client, stream=True, **long))
    text = [c.choices[0].delta.content or "" for c in [next(chunks)] if c.choices]
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=TINY, prompt=marked, max_tokens=20, temperature=0)
    assert e.value.status_code == 500 and "Traceback" not in e.value.message
    text += [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(text) == alone
    assert backend.ctx.inference.in_flight == 0 or wait_until(lambda: backend.ctx.inference.in_flight == 0) is None
    assert chat(client, max_tokens=2).choices


def test_the_generation_stack_is_imported_at_startup_not_at_the_first_completion(tmp_path: Path) -> None:
    """torch's extension modules initialise holding the GIL: imported by the first completion's loader thread, they
    stopped the event loop (every request and stream) for about 1.5 s. The app imports them before it serves."""
    code = ("import sys\n"
            "from fastapi.testclient import TestClient\n"
            "from app.core.config import Settings\n"
            "from app.main import create_app\n"
            f"app = create_app(Settings(data_dir={str(tmp_path)!r}, default_model=''))\n"
            "assert 'torch' not in sys.modules, 'imported before startup'\n"
            "with TestClient(app) as c:\n"
            "    assert 'unsloth_core.serving' in sys.modules and 'torch' in sys.modules\n"
            "    assert c.get('/health').status_code == 200\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]


def test_echo_with_logprobs_scores_the_prompt(backend: Backend, tiny_model_dir: Path) -> None:
    """Log-likelihoods as lm-eval's `local-completions` asks for them (echo, logprobs, max_tokens 0 or 1, token-id
    prompts): every prompt token but the first carries the model's own log-softmax of its logits, and the top
    alternatives; streamed, the echoed prompt comes with its logprobs before the completion's."""
    import json

    from unsloth_core.checkpoint import load_model
    from unsloth_core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_model_dir)
    model = load_model(tiny_model_dir, dtype=torch.float32).eval()
    prompt = tok.encode("The cat sat on")
    with torch.no_grad():
        lp = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    expected = [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    client = backend.client()

    scored = client.completions.create(model=TINY, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = scored.choices[0]
    lps = choice.logprobs
    assert choice.text == tok.decode(prompt) and choice.finish_reason == "length"
    assert lps is not None and lps.token_logprobs is not None and lps.top_logprobs is not None
    assert lps.tokens == [tok.decode([t]) for t in prompt] and lps.text_offset is not None
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert lps.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) <= 3 for top in lps.top_logprobs[1:])  # distinct texts: byte tokens may share one
    assert lps.text_offset == [sum(len(t) for t in lps.tokens[:i]) for i in range(len(prompt))]
    assert scored.usage is not None and scored.usage.completion_tokens == 0

    # lm-eval's request: one greedy token after the echoed prompt; the prompt's logprobs are the same
    out = client.completions.create(model=TINY, prompt=[prompt], max_tokens=1, echo=True, logprobs=1,
                                    temperature=0, extra_body={"ignore_eos": True})
    lps = out.choices[0].logprobs
    assert lps is not None and lps.token_logprobs is not None and len(lps.token_logprobs) == len(prompt) + 1
    assert lps.token_logprobs[1:-1] == pytest.approx(expected, abs=1e-4)
    assert lps.token_logprobs[-1] == pytest.approx(lp[-1].max().item(), abs=1e-4)  # greedy: the likeliest

    with httpx.stream("POST", backend.base_url + "/v1/completions", timeout=60,
                      json={"model": TINY, "prompt": prompt, "max_tokens": 2, "echo": True, "logprobs": 0,
                            "stream": True, "ignore_eos": True},
                      headers={"Authorization": f"Bearer {backend.user_key}"}) as r:
        chunks = [json.loads(x.removeprefix("data: ")) for x in r.iter_lines()
                  if x.startswith("data: ") and x != "data: [DONE]"]
    first = chunks[0]["choices"][0]
    assert first["text"] == tok.decode(prompt) and first["logprobs"]["token_logprobs"][0] is None
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks[1:]) == 2

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=TINY, prompt="abc", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_structured_output_follows_the_schema(backend: Backend) -> None:
    """`response_format` through the openai SDK: `parse` with a pydantic model (a strict json_schema), the same
    streamed, and json_object; a schema the grammar engine cannot hold is a 400 naming it, before any generation."""
    import json
    from typing import Literal

    import pydantic

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=5)
        legs: int = pydantic.Field(ge=0, le=8)
        kind: Literal["cat", "dog", "eel"]

    client = backend.client()
    parsed = client.chat.completions.parse(model=TINY, messages=HI, response_format=Pet, max_tokens=200,
                                           temperature=1.0, seed=5)
    choice = parsed.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet)
    assert Pet.model_validate_json(choice.message.content or "") == choice.message.parsed

    schema = Pet.model_json_schema()
    with client.chat.completions.stream(model=TINY, messages=HI, response_format=Pet, max_tokens=200,
                                        temperature=1.0, seed=6) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Pet) and "legs" in schema["properties"]

    any_object = chat(client, response_format={"type": "json_object"}, max_tokens=300, temperature=0.7, seed=1)
    if any_object.choices[0].finish_reason == "stop":  # a random model may run out of tokens inside a string
        assert isinstance(json.loads(any_object.choices[0].message.content), dict)

    with pytest.raises(openai.BadRequestError) as e:
        chat(client, response_format={"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object", "dependentSchemas": {"a": {}}}}})
    assert e.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
    assert "dependentSchemas" in e.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, response_format={"type": "json_schema"})
    assert e.value.body["param"] == "response_format.json_schema"  # type: ignore[index]
