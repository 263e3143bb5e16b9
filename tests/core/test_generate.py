"""Generation: KV cache vs recompute, batching, seeds, stops, streaming, logprobs, penalties, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import make_tiny_tokenizer, tiny_model
from unsloth_core.errors import ContextLengthError
from unsloth_core.generate import Generator
from unsloth_core.lora import apply_lora, lora_layers
from unsloth_core.model import Llama
from unsloth_core.sampling import Sampler, SamplingParams
from unsloth_core.tokenizer import StreamDecoder, Tokenizer

NO_EOS = dict(stop_token_ids=[])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model() -> Llama:
    return tiny_model(seed=11, std=0.3)


@pytest.fixture(scope="module")
def gen(model: Llama, tok: Tokenizer) -> Generator:
    return Generator(model, tok)


def greedy_by_recompute(model: Llama, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(x).logits[0, -1].argmax())
            out.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    return out


def test_kv_cache_matches_recompute(gen: Generator, model: Llama) -> None:
    ids = [5, 17, 99, 3, 250, 42]
    out = gen.generate([ids], SamplingParams(temperature=0, max_new_tokens=24, **NO_EOS))[0]
    assert out.token_ids == greedy_by_recompute(model, ids, 24)
    assert out.finish_reason == "length" and out.prompt_tokens == len(ids)


def test_batched_equals_one_by_one(gen: Generator) -> None:
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14], [200]]
    params = SamplingParams(temperature=0, max_new_tokens=12, **NO_EOS)
    batched = gen.generate(prompts, params)
    for p, b in zip(prompts, batched):
        assert gen.generate([p], params)[0].token_ids == b.token_ids


def test_same_seed_same_sample(gen: Generator) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=123, **NO_EOS)
    a = gen.generate(["hello"], params)[0].token_ids
    b = gen.generate(["hello"], params)[0].token_ids
    c = gen.generate(["hello"], SamplingParams(temperature=1.0, max_new_tokens=16, seed=124, **NO_EOS))[0].token_ids
    assert a == b
    assert a != c
    # A row's sample does not depend on what else is in the batch.
    batch = gen.generate(["other prompt", "hello"], [SamplingParams(temperature=1.0, max_new_tokens=16, seed=5,
                                                                      **NO_EOS), params])
    assert batch[1].token_ids == a


def test_narrow_filters_reduce_to_greedy(gen: Generator) -> None:
    greedy = gen.generate(["abc"], SamplingParams(temperature=0, max_new_tokens=10, **NO_EOS))[0].token_ids
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        out = gen.generate(["abc"], SamplingParams(temperature=1.5, max_new_tokens=10, seed=1, **NO_EOS, **kw))
        assert out[0].token_ids == greedy, kw


def test_stop_string_cuts_exactly(gen: Generator) -> None:
    full = gen.generate(["stop test"], SamplingParams(temperature=0, max_new_tokens=30, **NO_EOS))[0].text
    stop = full[7:10]  # a string that first appears at some character (maybe earlier than 7)
    first = full.index(stop)
    out = gen.generate(["stop test"], SamplingParams(temperature=0, max_new_tokens=30, stop=[stop], **NO_EOS))[0]
    assert out.text == full[:first]
    assert out.finish_reason == "stop"
    streamed = "".join(d.text for ds in gen.stream(["stop test"], SamplingParams(
        temperature=0, max_new_tokens=30, stop=[stop], **NO_EOS)) for d in ds)
    assert streamed == full[:first]  # the held-back prefix of the stop string is never emitted


def test_eos_token_stops(gen: Generator) -> None:
    ids = [5, 17, 99]
    free = gen.generate([ids], SamplingParams(temperature=0, max_new_tokens=8, **NO_EOS))[0]
    third = free.token_ids[2]
    out = gen.generate([ids], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=[third]))[0]
    assert out.token_ids == free.token_ids[:2] and out.finish_reason == "stop"


def test_stream_concatenates_to_generate(gen: Generator) -> None:
    params = SamplingParams(temperature=0.7, max_new_tokens=20, seed=9, **NO_EOS)
    whole = gen.generate(["stream me", "and me too"], params)
    texts = ["", ""]
    finishes: list[str | None] = [None, None]
    for deltas in gen.stream(["stream me", "and me too"], params):
        for d in deltas:
            texts[d.index] += d.text
            finishes[d.index] = d.finish_reason or finishes[d.index]
    assert texts == [w.text for w in whole]
    assert finishes == ["length", "length"]


def test_closing_the_stream_stops_generation(gen: Generator) -> None:
    it = gen.stream(["x"], SamplingParams(temperature=0, max_new_tokens=50, **NO_EOS))
    next(it)
    it.close()  # what the server does when a client disconnects
    with pytest.raises(StopIteration):
        next(it)
    assert not gen.engine._live and gen.engine._waiting.empty()  # its row is free at once


def test_stream_decoder_never_splits_characters(tok: Tokenizer) -> None:
    text = "über café ☕ 😀 done"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode())  # one token per byte: multi-byte characters span several tokens
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_logprobs_match_the_model(gen: Generator, model: Llama) -> None:
    ids = [10, 20, 30]
    out = gen.generate([ids], SamplingParams(temperature=0, max_new_tokens=3, logprobs=2, **NO_EOS))[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(lp[first.token_id].item(), abs=1e-4)
    assert [t[0] for t in first.top] == lp.topk(2).indices.tolist()


def test_prompt_longer_than_context_is_refused(model: Llama, tok: Tokenizer) -> None:
    gen = Generator(model, tok, max_seq_length=64)
    with pytest.raises(ContextLengthError, match="context is 64 tokens"):
        gen.generate([list(range(60))], SamplingParams(max_new_tokens=10))


def test_bad_sampling_params_are_refused() -> None:
    for kw in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=-1), dict(stop=[""]), dict(logprobs=21)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    s = Sampler([SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=2.0)], 4,
                torch.device("cpu"))
    s.observe_prompt(0, [3])
    s.observe(torch.tensor([0]))
    s.observe(torch.tensor([0]))
    s.observe(torch.tensor([1]))
    out = s.penalize(logits)
    # token 0: seen, 2 generated -> 2/2 - 0.5*2 - 0.25; token 1: -1*2 - 0.5 - 0.25; 2: untouched; 3: prompt only
    assert torch.allclose(out, torch.tensor([[1.0 - 1.0 - 0.25, -2.0 - 0.5 - 0.25, 0.5, 0.5]]))


def test_logit_bias_shifts_each_rows_logits() -> None:
    """OpenAI's logit_bias: added to the named tokens' logits of that row only; -100 bans a token, 100 forces it;
    a row with a bias is not plain greedy (the engine's shared argmax would skip it); bad maps are refused."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0], [2.0, -1.0, 0.5, 1.0]])
    s = Sampler([SamplingParams(temperature=0, logit_bias={0: -100, 2: 1.0}), SamplingParams(temperature=0)], 4,
                torch.device("cpu"))
    assert not s.plain_greedy
    assert torch.equal(s.penalize(logits), torch.tensor([[-98.0, -1.0, 1.5, 1.0], [2.0, -1.0, 0.5, 1.0]]))
    assert s.sample(logits).tolist() == [2, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Sampler([SamplingParams(logit_bias={4: 1.0})], 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
    with pytest.raises(ValueError, match="64 bits"):
        SamplingParams(seed=2**64)


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    probs = logits.softmax(-1)[0]
    s = Sampler([SamplingParams(temperature=1.0, seed=0)], 4, torch.device("cpu"))
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[s.sample(logits)] += 1
    assert torch.allclose(counts / 4000, probs, atol=0.03)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens(model: Llama) -> None:
    """The static-shape step compiled by torch.compile (CUDA graphs on a GPU; inductor's C++ on this CPU)."""
    params = SamplingParams(temperature=0, max_new_tokens=20, **NO_EOS)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    eager = Generator(model, None).generate(prompts, params)
    compiled = Generator(model, None, compile=True, max_seq_length=64, sync_every=4)
    assert [c.token_ids for c in compiled.generate(prompts, params)] == [c.token_ids for c in eager]


class TensorsFromHostData(TorchDispatchMode):
    """Counts tensors built from Python data (`torch.tensor(...)`): on a GPU each is a blocking host-to-device copy."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.count += func is torch.ops.aten.lift_fresh.default
        return func(*args, **(kwargs or {}))


def test_decode_steps_build_no_tensors_from_host_data(model: Llama) -> None:
    """Every step's inputs are derived on the device, so a compiled step on a GPU never waits for the host."""
    def count(new_tokens: int) -> int:
        with TensorsFromHostData() as mode:
            Generator(model, None).generate([[1, 2, 3], [4, 5]],
                                            SamplingParams(temperature=0, max_new_tokens=new_tokens, **NO_EOS))
        return mode.count

    assert count(12) == count(2)


def test_generation_runs_in_eval_mode_and_restores_the_mode(model: Llama) -> None:
    """A model straight out of training (train mode, LoRA dropout) generates without dropout, then trains on."""
    lora = apply_lora(copy.deepcopy(model), r=4, alpha=8, dropout=0.5, seed=0)
    with torch.no_grad():
        for _, layer in lora_layers(lora):
            layer.lora_B.weight.normal_(0, 0.5)
    params = SamplingParams(temperature=0, max_new_tokens=8, **NO_EOS)
    expected = Generator(lora.eval(), None).generate([[1, 2, 3]], params)[0].token_ids
    lora.train()
    for _ in range(2):
        assert Generator(lora, None).generate([[1, 2, 3]], params)[0].token_ids == expected
    assert lora.training


def test_sampling_never_picks_a_filtered_token_and_reaches_the_vocabulary_tail() -> None:
    """Inverting the cumulative distribution: a token top-k removed (probability 0) is never drawn, the kept ones
    follow their renormalised probabilities, and in a 128k vocabulary the last token is drawn when it holds the mass
    (the fp64 cumulative sum keeps the tail)."""
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    s = Sampler([SamplingParams(temperature=1.0, top_k=2, seed=3)], 4, torch.device("cpu"))
    counts = torch.zeros(4)
    for _ in range(3000):
        counts[s.sample(logits)] += 1
    kept = torch.tensor([1.0, 0.0, 0.0, 2.0]).exp() * torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert counts[1] == counts[2] == 0
    assert torch.allclose(counts / 3000, kept / kept.sum(), atol=0.03)
    tail = torch.full((2, 128256), -30.0)
    tail[:, -1] = 30.0
    tail[1, -2] = 30.0  # row 1: the last two tokens share the mass
    picks = Sampler([SamplingParams(temperature=1.0, seed=i) for i in range(2)], 128256,
                    torch.device("cpu"))
    drawn = {tuple(picks.sample(tail).tolist()) for _ in range(200)}
    assert {row0 for row0, _ in drawn} == {128255} and {row1 for _, row1 in drawn} == {128254, 128255}
