"""Continuous batching: concurrent requests in one decode loop give what each would get alone."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

import unsloth_core.model as model_module
from tests.helpers import make_tiny_tokenizer, tiny_model, wait_until
from unsloth_core import serving
from unsloth_core.errors import CapacityError, ContextLengthError, EngineClosedError
from unsloth_core.generate import Delta, Generator
from unsloth_core.model import KVCache, Llama
from unsloth_core.sampling import SamplingParams
from unsloth_core.serving import BatchEngine, Stream
from unsloth_core.tokenizer import Tokenizer

NO_EOS = dict(stop_token_ids=[])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model() -> Llama:
    return tiny_model(seed=12, std=0.3)


def collect(deltas: list[Delta]) -> tuple[str, list[int], str | None]:
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason


def test_concurrent_requests_match_generating_alone(model: Llama, tok: Tokenizer) -> None:
    """Requests of different lengths that finish at different steps (rows retire and are compacted)."""
    reference = Generator(tiny_model(seed=12, std=0.3), tok)
    engine = BatchEngine(model, tok, max_batch_size=4, max_seq_length=128)
    cases = [([1, 2, 3], 5), ([9, 8, 7, 6, 5, 4], 17), ([42], 9), ([11, 12], 3), ([200, 100, 50, 25], 12),
             ([7] * 10, 20)]  # more requests than rows: some wait for a free row
    params = [SamplingParams(temperature=0, max_new_tokens=n, **NO_EOS) for _, n in cases]
    streams = [engine.submit(p, sp) for (p, _), sp in zip(cases, params)]
    results = [list(s) for s in streams]
    engine.close()
    for (prompt, n), sp, deltas in zip(cases, params, results):
        expected = reference.generate([prompt], sp)[0]
        _, ids, finish = collect(deltas)
        assert ids == expected.token_ids and finish == "length" and len(ids) == n


def test_seeded_sampling_and_stop_strings_match_the_generator(model: Llama, tok: Tokenizer) -> None:
    engine = BatchEngine(model, tok, max_batch_size=8, max_seq_length=128)
    reference = Generator(tiny_model(seed=12, std=0.3), tok)
    sampled = SamplingParams(temperature=0.9, top_p=0.95, seed=3, max_new_tokens=16, **NO_EOS)
    free_text = reference.generate(["stop here"], SamplingParams(temperature=0, max_new_tokens=24, **NO_EOS))[0].text
    stopped = SamplingParams(temperature=0, max_new_tokens=24, stop=[free_text[5:8]], **NO_EOS)
    a, b = engine.submit(tok.encode("seeded"), sampled), engine.submit(tok.encode("stop here"), stopped)
    sample_deltas, stop_deltas = list(a), list(b)
    engine.close()
    assert collect(sample_deltas)[1] == reference.generate(["seeded"], sampled)[0].token_ids
    text, _, finish = collect(stop_deltas)
    assert text == free_text[: free_text.index(free_text[5:8])] and finish == "stop"


def test_cancel_frees_the_row(model: Llama, tok: Tokenizer) -> None:
    engine = BatchEngine(model, tok, max_batch_size=1, max_seq_length=256)
    long = engine.submit([1, 2], SamplingParams(temperature=0, max_new_tokens=200, **NO_EOS))
    first = next(iter(long))
    assert first.token_ids
    long.cancel()
    rest = list(long)
    assert len(rest) < 199  # stopped well before its 200 tokens
    after = engine.submit([3, 4], SamplingParams(temperature=0, max_new_tokens=4, **NO_EOS))  # the one row is free
    assert collect(list(after))[2] == "length"
    engine.close()


def test_many_threads_submit_at_once(model: Llama, tok: Tokenizer) -> None:
    engine = BatchEngine(model, tok, max_batch_size=8, max_seq_length=128)
    out: dict[int, list[int]] = {}

    def client(i: int) -> None:
        out[i] = collect(list(engine.submit([i + 1, i + 2], SamplingParams(temperature=0, max_new_tokens=6,
                                                                            **NO_EOS))))[1]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    engine.close()
    reference = Generator(tiny_model(seed=12, std=0.3), tok)
    for i in range(12):
        assert out[i] == reference.generate([[i + 1, i + 2]], SamplingParams(temperature=0, max_new_tokens=6,
                                                                            **NO_EOS))[0].token_ids


def test_bad_requests_are_refused_at_submit(model: Llama, tok: Tokenizer) -> None:
    engine = BatchEngine(model, tok, max_seq_length=32)
    with pytest.raises(ContextLengthError):
        engine.submit(list(range(30)), SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    engine.close()


def test_stream_interface_matches_the_generator(model: Llama, tok: Tokenizer) -> None:
    """The `n` choices of one call share a Stream; text, ids, finish reasons and logprobs as Generator.stream."""
    engine = BatchEngine(model, tok, max_batch_size=4, max_seq_length=128)
    reference = Generator(tiny_model(seed=12, std=0.3), tok)
    params = [SamplingParams(temperature=0, max_new_tokens=7, logprobs=2, **NO_EOS),
              SamplingParams(temperature=0.7, seed=1, max_new_tokens=5, **NO_EOS)]
    got: dict[int, list[Delta]] = {0: [], 1: []}
    for deltas in engine.stream(["one prompt", "another"], params):
        for d in deltas:
            got[d.index].append(d)
    engine.close()
    expected = reference.generate(["one prompt", "another"], params)
    for i in (0, 1):
        text, ids, finish = collect(got[i])
        assert (text, ids, finish) == (expected[i].text, expected[i].token_ids, expected[i].finish_reason)
    lps = [lp for d in got[0] for lp in d.logprobs or []]
    assert expected[0].logprobs is not None
    assert [lp.token_id for lp in lps] == [lp.token_id for lp in expected[0].logprobs]
    assert [lp.logprob for lp in lps] == pytest.approx([lp.logprob for lp in expected[0].logprobs], abs=1e-4)


def test_cache_grows_under_live_rows_and_is_freed_when_idle(tok: Tokenizer) -> None:
    model = tiny_model(seed=12, std=0.3)  # its own model: no cache left by other tests
    engine = BatchEngine(model, tok, max_batch_size=4, max_seq_length=512, idle_free_s=0.2)
    reference = Generator(tiny_model(seed=12, std=0.3), tok)
    short_params = SamplingParams(temperature=0, max_new_tokens=40, **NO_EOS)
    long_prompt = [(7 * i) % 250 for i in range(300)]
    long_params = SamplingParams(temperature=0, max_new_tokens=10, **NO_EOS)
    short = engine.submit([5, 6, 7], short_params)
    first = next(iter(short))  # admitted with a small cache (one row, 256 slots)...
    assert model.cache_shape == (1, 256)
    long = engine.submit(long_prompt, long_params)  # ...which must grow to 2 rows x 512 slots while it is live
    short_ids = first.token_ids + collect(list(short))[1]
    long_ids = collect(list(long))[1]
    assert short_ids == reference.generate([[5, 6, 7]], short_params)[0].token_ids
    assert long_ids == reference.generate([long_prompt], long_params)[0].token_ids

    deadline = time.monotonic() + 5
    while model.cache_shape is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model.cache_shape is None  # idle: the cache was given back
    engine.close()


def test_a_request_that_runs_out_of_memory_fails_alone(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Growing the cache for a second row runs out of memory half way through the layers: that request gets a
    CapacityError; the running one keeps its cache and finishes as it would alone; the engine serves on."""
    grown: list[int] = []

    class OutOfMemoryAtTwoRows(KVCache):
        def __init__(self, batch_size: int, *args: Any, **kwargs: Any) -> None:
            if batch_size >= 2:
                grown.append(batch_size)
                if len(grown) > 1:  # the first layer's new cache fits, the second does not
                    raise torch.OutOfMemoryError("CUDA out of memory (test)")
            super().__init__(batch_size, *args, **kwargs)

    monkeypatch.setattr(model_module, "KVCache", OutOfMemoryAtTwoRows)
    reference = Generator(tiny_model(seed=12, std=0.3), tok)
    engine = BatchEngine(tiny_model(seed=12, std=0.3), tok, max_batch_size=4, max_seq_length=128)  # no cache yet
    long = SamplingParams(temperature=0, max_new_tokens=30, **NO_EOS)
    items: list[Delta | BaseException | None] = []
    second_queued = threading.Event()

    def on_item(item: Delta | BaseException | None) -> None:  # on the engine's thread
        items.append(item)
        if len(items) == 1:  # the first request holds row 0: keep it running until the second one is queued
            second_queued.wait(timeout=30)

    engine.submit([1, 2, 3], long, stream=Stream(1, on_item))
    wait_until(lambda: items)
    refused = engine.submit([4, 5], SamplingParams(temperature=0, max_new_tokens=4, **NO_EOS))
    second_queued.set()
    with pytest.raises(CapacityError, match="not enough cpu memory"):
        list(refused)
    wait_until(lambda: items[-1] is None)
    deltas = [d for d in items if isinstance(d, Delta)]
    assert len(deltas) == len(items) - 1
    assert collect(deltas)[1] == reference.generate([[1, 2, 3]], long)[0].token_ids
    later = SamplingParams(temperature=0, max_new_tokens=5, **NO_EOS)
    assert collect(list(engine.submit([7, 8], later)))[1] == reference.generate([[7, 8]], later)[0].token_ids
    engine.close()


def gated(first_item_waits_for: threading.Event) -> tuple[Stream, list[Delta | BaseException | None]]:
    """A push-mode stream whose first item holds the engine's thread until the event is set."""
    items: list[Delta | BaseException | None] = []

    def on_item(item: Delta | BaseException | None) -> None:
        items.append(item)
        if len(items) == 1:
            first_item_waits_for.wait(timeout=30)

    return Stream(1, on_item), items


def test_a_retired_engine_finishes_its_requests_then_frees_its_cache(tok: Tokenizer) -> None:
    """What an evicted model's engine does: the streams already running end normally, then the cache goes."""
    model = tiny_model(seed=12, std=0.3)
    engine = BatchEngine(model, tok, max_batch_size=4, max_seq_length=128)
    params = SamplingParams(temperature=0, max_new_tokens=40, **NO_EOS)
    retired = threading.Event()
    stream, items = gated(retired)
    engine.submit([1, 2, 3], params, stream=stream)
    wait_until(lambda: items)
    engine.retire()
    retired.set()
    wait_until(lambda: items[-1] is None)
    deltas = [d for d in items if isinstance(d, Delta)]
    assert len(deltas) == len(items) - 1  # no error
    assert collect(deltas)[1] == Generator(tiny_model(seed=12, std=0.3), tok).generate([[1, 2, 3]], params)[0].token_ids
    wait_until(lambda: model.cache_shape is None)
    engine.close()


def test_a_closed_engine_ends_its_requests_with_an_error(tok: Tokenizer) -> None:
    """Closing (the server going away) must not leave a request waiting forever for its next token."""
    engine = BatchEngine(tiny_model(seed=12, std=0.3), tok, max_batch_size=4, max_seq_length=128)
    closing = threading.Event()
    stream, items = gated(closing)
    engine.submit([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=100, **NO_EOS), stream=stream)
    waiting = engine.submit([4, 5], SamplingParams(temperature=0, max_new_tokens=5, **NO_EOS))  # queued behind it
    wait_until(lambda: items)
    closer = threading.Thread(target=engine.close)
    closer.start()
    engine._stop.wait(timeout=30)
    closing.set()
    closer.join(timeout=30)
    assert isinstance(items[-2], EngineClosedError) and items[-1] is None
    with pytest.raises(EngineClosedError, match="unloaded"):
        list(waiting)


MARK, MARK_SEED = [77, 77, 77], 4242  # the request a fault is injected into


def _inject(stage: str, engine: BatchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the marked request fail at `stage` of its life in the engine, and only it."""
    def boom() -> RuntimeError:
        return RuntimeError(f"injected at {stage}")

    if stage == "admit":  # its sampler cannot be made (today's real case: a seed torch refuses)
        class Refusing(serving.Sampler):
            def __init__(self, params: Any, *args: Any) -> None:
                if params[0].seed == MARK_SEED:
                    raise boom()
                super().__init__(params, *args)

        monkeypatch.setattr(serving, "Sampler", Refusing)
    elif stage == "prefill":
        forward = engine.model.hidden_states

        def hidden_states(ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if ids.size(1) > 1 and any(row[:3].tolist() == MARK for row in ids):  # a batched prefill holding it
                raise boom()
            return forward(ids, *args, **kwargs)

        monkeypatch.setattr(engine.model, "hidden_states", hidden_states)
    elif stage == "decode":  # the batched step fails whenever the marked row is in it
        step = BatchEngine._step

        def failing_step(self: BatchEngine, requests: list[Any], *args: Any) -> torch.Tensor:
            if any(r.prompt == MARK for r in requests):
                raise boom()
            return step(self, requests, *args)

        monkeypatch.setattr(BatchEngine, "_step", failing_step)
    elif stage == "sample":
        sample = serving.Sampler.sample

        def failing_sample(self: Any, logits: torch.Tensor) -> torch.Tensor:
            if self.generators and self.temperature[0, 0].item() == 0.5:
                raise boom()
            return sample(self, logits)

        monkeypatch.setattr(serving.Sampler, "sample", failing_sample)
    else:
        emit = BatchEngine._emit

        def failing_emit(self: BatchEngine, r: Any, *args: Any) -> None:
            if r.prompt == MARK:
                raise boom()
            emit(self, r, *args)

        monkeypatch.setattr(BatchEngine, "_emit", failing_emit)


@pytest.mark.parametrize("stage", ["admit", "prefill", "decode", "sample", "emit"])
def test_a_failure_in_one_request_ends_that_request_alone(stage: str, tok: Tokenizer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault in one request at any stage ends it with the error; the requests batched beside it finish with the
    tokens they get without it, and the engine goes on serving."""
    reference = Generator(tiny_model(seed=12, std=0.3), tok)
    engine = BatchEngine(tiny_model(seed=12, std=0.3), tok, max_batch_size=4, max_seq_length=128)
    _inject(stage, engine, monkeypatch)
    greedy = SamplingParams(temperature=0, max_new_tokens=20, **NO_EOS)
    neighbours = [[1, 2, 3], [9, 8, 7, 6], [42]]
    release = threading.Event()
    first, first_items = gated(release)  # holds the engine until every request is queued: they share a batch
    engine.submit(neighbours[0], greedy, stream=first)
    marked = engine.submit(MARK, SamplingParams(temperature=0.5, seed=MARK_SEED, max_new_tokens=20, **NO_EOS))
    others = [engine.submit(p, greedy) for p in neighbours[1:]]
    release.set()
    with pytest.raises(RuntimeError, match=f"injected at {stage}"):
        list(marked)
    got = [collect(list(s))[1] for s in others]
    wait_until(lambda: first_items and first_items[-1] is None)
    got.insert(0, collect([d for d in first_items if isinstance(d, Delta)])[1])
    assert got == [reference.generate([p], greedy)[0].token_ids for p in neighbours]
    later = SamplingParams(temperature=0, max_new_tokens=5, **NO_EOS)
    assert collect(list(engine.submit([7, 8], later)))[1] == reference.generate([[7, 8]], later)[0].token_ids
    wait_until(lambda: not engine._live)
    engine.close()


def test_the_compiled_static_step_serves_as_the_eager_one_does(tok: Tokenizer) -> None:
    """static_step.py (inductor's C++ here; CUDA graphs on a GPU: tests/core/test_device.py): greedy, seeded and
    logprob rows that arrive while others run, finish at different steps, and grow the cache past its first 256
    slots give what the eager Generator gives each alone."""
    model = tiny_model(seed=12, std=0.3)
    engine = BatchEngine(model, tok, max_batch_size=4, max_seq_length=512, compile=True)
    reference = Generator(tiny_model(seed=12, std=0.3), tok)
    cases = [([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=30, **NO_EOS)),
             ([9, 8, 7], SamplingParams(temperature=0.8, seed=5, max_new_tokens=12, **NO_EOS)),
             ([4, 4], SamplingParams(temperature=0, max_new_tokens=9, logprobs=1, **NO_EOS)),
             ([(7 * i) % 250 for i in range(300)], SamplingParams(temperature=0, max_new_tokens=6, **NO_EOS)),
             ([42], SamplingParams(temperature=0, max_new_tokens=20, **NO_EOS))]
    first = engine.submit(*cases[0])
    head = next(iter(first))  # running before the others arrive
    streams = [first] + [engine.submit(p, sp) for p, sp in cases[1:]]
    results = [collect(([head] if s is first else []) + list(s)) for s in streams]
    assert engine.compile  # no fallback to the eager step happened
    assert engine._static is not None
    # Each (batch bucket, cache size) is a compile of its own: past dynamo's default 8 the step would go eager.
    # Dynamo's config is per thread: read it on the engine's.
    limits: list[int] = []
    probe = Stream(1, lambda _: limits.append(torch._dynamo.config.recompile_limit))
    engine.submit([5], SamplingParams(temperature=0, max_new_tokens=1, **NO_EOS), stream=probe)
    wait_until(lambda: len(limits) >= 2)
    assert min(limits) >= 64
    engine.close()
    for (prompt, sp), (_, ids, finish) in zip(cases, results):
        assert ids == reference.generate([prompt], sp)[0].token_ids and finish == "length"


def test_a_failing_compiled_step_falls_back_to_the_eager_one(model: Llama, tok: Tokenizer,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from unsloth_core.static_step import StaticStep

    def broken(*_: Any) -> torch.Tensor:
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(StaticStep, "__call__", broken)
    engine = BatchEngine(model, tok, max_batch_size=2, max_seq_length=64, compile=True)
    params = SamplingParams(temperature=0, max_new_tokens=6, **NO_EOS)
    with pytest.warns(RuntimeWarning, match="compiled decode step failed .*no kernel image"):
        _, ids, _ = collect(list(engine.submit([1, 2, 3], params)))
    assert not engine.compile
    engine.close()
    assert ids == Generator(tiny_model(seed=12, std=0.3), tok).generate([[1, 2, 3]], params)[0].token_ids


def _completions(gen: Generator, prompts: list[str], params: list[SamplingParams]) -> list[tuple[Any, ...]]:
    """Text, tokens, finish and logprobs; logprobs to 1e-5 (a row's logits differ in their last bits with the
    other rows batched beside it, and the read-back timing decides when rows retire)."""
    return [(c.text, c.token_ids, c.finish_reason,
             [(lp.token_id, round(lp.logprob, 5), [t[0] for t in lp.top]) for lp in c.logprobs or []])
            for c in gen.generate(prompts, params)]


def test_tokens_read_back_in_blocks_come_out_as_tokens_read_every_step(model: Llama, tok: Tokenizer,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`sync_every` > 1 (Generator's setting on a GPU, where the host then queues steps without waiting): rows that
    meet EOS, a stop string or their token limit inside a block, seeded sampling with logprobs, and requests that
    wait for a free row (three rows for five) come out exactly as with a read-back after every step."""
    greedy = SamplingParams(temperature=0, max_new_tokens=24, **NO_EOS)
    free = Generator(model, tok).generate(["end early"], greedy)[0]
    prompts = ["end early", "stop string", "sampled", "short", "long one"]
    params = [SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=[free.token_ids[5]]),
              SamplingParams(temperature=0, max_new_tokens=24, stop=[free.text[3:5]], **NO_EOS),
              SamplingParams(temperature=0.8, seed=5, max_new_tokens=13, logprobs=2, **NO_EOS),
              SamplingParams(temperature=0, max_new_tokens=3, **NO_EOS),
              SamplingParams(temperature=0, max_new_tokens=26, repetition_penalty=1.3, **NO_EOS)]  # the longest
    every_step = _completions(Generator(model, tok, max_batch_size=3), prompts, params)
    # The context exactly as long as the longest request: decoding a row past its limit would write past the cache.
    in_blocks = Generator(model, tok, max_batch_size=3, sync_every=4,
                          max_seq_length=max(len(tok.encode(p)) + sp.max_new_tokens for p, sp in zip(prompts, params)))
    flushed = BatchEngine._flush
    blocks: list[int] = []

    def counting(self: BatchEngine, *args: Any) -> None:
        blocks.append(len(self._pending))
        flushed(self, *args)

    monkeypatch.setattr(BatchEngine, "_flush", counting)
    assert _completions(in_blocks, prompts, params) == every_step
    assert max(blocks) == 4  # whole blocks were read back at once
    assert every_step[0][2] == "stop" and len(every_step[0][1]) < 24  # EOS came inside a block
    assert not in_blocks.engine._live and not in_blocks.engine._pending
    # A row is never decoded past its limit (that would write past its reserved cache slots): 26 tokens are the
    # prefill's and 25 decode steps, not 7 blocks of 4.
    step, steps = BatchEngine._step, []

    def counting_steps(self: BatchEngine, *args: Any) -> torch.Tensor:
        steps.append(1)
        return step(self, *args)

    monkeypatch.setattr(BatchEngine, "_step", counting_steps)
    assert len(in_blocks.generate(["long one"], params[-1])[0].token_ids) == 26 and len(steps) == 25


def counted_prefills(model: Llama, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (rows, tokens) of each prefill forward the model runs from now on."""
    forward = model.hidden_states
    prefills: list[tuple[int, int]] = []

    def counting(ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if ids.size(1) > 1:
            prefills.append(tuple(ids.shape))  # type: ignore[arg-type]
        return forward(ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", counting)
    return prefills


def test_waiting_prompts_are_prefilled_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests waiting at a step share one prefill forward (right-padded), up to `max_prefill_tokens` of padded
    prompt, and each gets the tokens it gets prefilled alone."""
    model = tiny_model(seed=12, std=0.3)
    prefills = counted_prefills(model, monkeypatch)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4], [42, 43], [11, 12, 13, 14]]
    params = SamplingParams(temperature=0, max_new_tokens=8, **NO_EOS)
    alone = [Generator(tiny_model(seed=12, std=0.3), None).generate([p], params)[0].token_ids for p in prompts]
    gen = Generator(model, None)
    assert [c.token_ids for c in gen.generate(prompts, params)] == alone
    assert prefills == [(4, 6)]  # one forward for the four
    prefills.clear()
    gen.engine.max_prefill_tokens = 12  # two rows of six, then two of four
    assert [c.token_ids for c in gen.generate(prompts, params)] == alone
    assert prefills == [(2, 6), (2, 4)]


def test_identical_prompts_share_one_prefill_and_get_what_they_get_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GRPO group or a request's `n` choices: the same prompt is run once, its cache row copied to the others;
    each still gets the tokens and prompt logprobs it gets alone."""
    model = tiny_model(seed=12, std=0.3)
    prefills = counted_prefills(model, monkeypatch)
    a, b, c = [1, 2, 3, 4, 5], [9, 8, 7], [42, 43, 44, 45, 46, 47]
    prompts = [a, b, a, a, c, b, a]
    params = SamplingParams(temperature=0, max_new_tokens=8, prompt_logprobs=2, **NO_EOS)
    reference = Generator(tiny_model(seed=12, std=0.3), None)
    alone = [reference.generate([p], params)[0] for p in prompts]
    got = Generator(model, None).generate(prompts, params)
    assert prefills == [(3, 6)]  # a, b and c once each
    for mine, theirs in zip(got, alone):
        assert mine.token_ids == theirs.token_ids
        assert mine.prompt_logprobs is not None and theirs.prompt_logprobs is not None
        assert [p and round(p.logprob, 4) for p in mine.prompt_logprobs] == \
            [p and round(p.logprob, 4) for p in theirs.prompt_logprobs]


def test_shared_prompts_maps_each_request_to_the_run_that_holds_its_prompt() -> None:
    assert serving.shared_prompts(["a", "b", "a", "c", "b"]) == ([0, 1, 3], [0, 1, 0, 2, 1])
    assert serving.shared_prompts([]) == ([], [])


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps() -> None:
    """A prompt longer than `prefill_chunk` that arrives while rows decode is prefilled a chunk a step: the running
    rows get a token after each chunk, a row that retires meanwhile moves the partly filled row down with it, and
    every request gets the tokens it gets alone."""
    model = tiny_model(seed=12, std=0.3)
    params = {"running": SamplingParams(temperature=0, max_new_tokens=30, **NO_EOS),
              "short": SamplingParams(temperature=0, max_new_tokens=3, **NO_EOS),  # retires after chunk 1
              "long": SamplingParams(temperature=0, max_new_tokens=10, **NO_EOS)}
    prompts = {"running": [1, 2, 3], "short": [9, 8], "long": [(7 * i) % 250 for i in range(150)]}
    alone = {k: Generator(tiny_model(seed=12, std=0.3), None).generate([prompts[k]], params[k])[0].token_ids
             for k in prompts}
    engine = BatchEngine(model, None, max_batch_size=4, max_seq_length=512, threaded=False, prefill_chunk=32)
    streams = {k: engine.submit(prompts[k], params[k]) for k in ("running", "short")}
    engine.step()  # both live, one token each
    streams["long"] = engine.submit(prompts["long"], params["long"])
    got: dict[str, list[int]] = {k: [] for k in prompts}
    while_filling = 0
    with torch.inference_mode():
        while engine.step():
            for k, s in streams.items():
                got[k] += [t for d in s.ready() for t in d.token_ids]
            while_filling += engine._prefilling is not None
    for k, s in streams.items():
        got[k] += [t for d in s.ready() for t in d.token_ids]
    assert while_filling == 4  # 150 tokens: chunks of 32 in five steps, the last one making it live
    assert len(got["running"]) >= 6 and got == alone


def _reference_prompt_logprobs(model: Llama, prompt: list[int], top: int) -> list[tuple[float, list[int]]]:
    """Each prompt token's logprob after the ones before it, and the top ids there: the model's own log-softmax of
    its logits over the whole prompt, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    lp = logits.log_softmax(-1)
    return [(lp[i - 1, prompt[i]].item(), lp[i - 1].topk(top).indices.tolist()) for i in range(1, len(prompt))]


@pytest.mark.parametrize("max_new", [0, 3])
def test_prompt_logprobs_equal_the_models_log_softmax(model: Llama, tok: Tokenizer, max_new: int) -> None:
    """Scoring prompts (echo + logprobs, lm-eval's log-likelihoods): batched with a prompt that generates, a long
    prompt prefilled in chunks while others decode, and with no new tokens at all (the request ends at its
    prefill and never takes a row)."""
    engine = BatchEngine(model, tok, max_batch_size=4, max_seq_length=256, prefill_chunk=16)
    chunks: list[int] = []
    chunk = engine._prefill_chunk
    engine._prefill_chunk = lambda r: chunks.append(len(r.prompt)) or chunk(r)  # type: ignore[method-assign]
    running = engine.submit([5, 6, 7], SamplingParams(temperature=0, max_new_tokens=40, **NO_EOS))
    wait_until(lambda: engine._live)  # so the long prompt below is prefilled in chunks between decode steps
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], list(range(40, 90)), [7, 7]]
    params = SamplingParams(temperature=0, max_new_tokens=max_new, prompt_logprobs=3, logprobs=2, **NO_EOS)
    streams = [engine.submit(p, params, index=i) for i, p in enumerate(prompts)]
    results = [list(s) for s in streams]
    assert len(collect(list(running))[1]) == 40  # the neighbour ran to its end
    engine.close()
    assert chunks.count(50) == 4  # the 50-token prompt went in 16-token chunks
    for prompt, deltas in zip(prompts, results):
        scored = deltas[0].prompt_logprobs
        assert scored is not None and scored[0] is None and len(scored) == len(prompt)
        assert all(d.prompt_logprobs is None for d in deltas[1:])  # only on the first event
        for got, (logprob, top) in zip(scored[1:], _reference_prompt_logprobs(model, prompt, 3)):
            assert got is not None
            assert got.logprob == pytest.approx(logprob, abs=1e-4)
            assert [i for i, _, _ in got.top] == top
        _, ids, finish = collect(deltas)
        assert len(ids) == max_new and finish == "length"


def test_zero_new_tokens_without_scoring_ends_at_once(model: Llama, tok: Tokenizer) -> None:
    engine = BatchEngine(model, tok, max_batch_size=2, max_seq_length=64)
    deltas = list(engine.submit([1, 2, 3], SamplingParams(max_new_tokens=0)))
    engine.close()
    assert [(d.text, d.token_ids, d.finish_reason, d.prompt_logprobs) for d in deltas] == [("", [], "length", None)]


def test_generator_returns_prompt_logprobs(model: Llama, tok: Tokenizer) -> None:
    out = Generator(model, tok).generate([[9, 8, 7, 6]], SamplingParams(max_new_tokens=0, prompt_logprobs=0))[0]
    assert out.token_ids == [] and out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    expected = _reference_prompt_logprobs(model, [9, 8, 7, 6], 1)
    assert [p.logprob for p in out.prompt_logprobs[1:] if p] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
