"""Generation on the caller's thread: a synchronous driver over the serving engine's step.

There is one generation engine (serving.BatchEngine): the API serves from it on its own thread, and `Generator`,
`generate`, `model.generate` and `unsloth generate` run the same step on the caller's thread, so prompt encoding,
per-row checks, the context clamp, EOS handling, prefill, the compiled decode step and the per-row emit are written
once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from unsloth_core.merged import merged_projections
from unsloth_core.model import Llama
from unsloth_core.request_state import (  # noqa: F401  (re-exported: the names callers import from here)
    Completion,
    Delta,
    FinishReason,
    Prompt,
    TokenLogprob,
    check_context,
    encode_prompt,
)
from unsloth_core.sampling import SamplingParams
from unsloth_core.serving import BatchEngine
from unsloth_core.tokenizer import Tokenizer

# Rows one Generator decodes together; more prompts than this wait for a free row (continuous batching).
MAX_BATCH_SIZE = 256


class Generator:
    """Generates from a model and tokenizer. One instance per model; not thread-safe (one call at a time).

    `compile`: decode base-model batches with the compiled static step (CUDA graphs on a GPU; default: on a GPU
    only). `sync_every`: decode steps between reads of the tokens back to the host (default: 8 when compiled on a
    GPU, where the host then queues steps without waiting for the device; else 1)."""

    def __init__(self, model: Llama, tokenizer: Tokenizer | None, compile: bool | None = None,
                 max_seq_length: int | None = None, max_batch_size: int = MAX_BATCH_SIZE,
                 sync_every: int | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.engine = BatchEngine(model, tokenizer, max_batch_size=max_batch_size, max_seq_length=max_seq_length,
                                  compile=compile, threaded=False)
        if sync_every is None:
            sync_every = 8 if self.engine.compile and model.device.type == "cuda" else 1
        self.engine.sync_every = sync_every
        self.max_seq_length = self.engine.max_seq_length

    @property
    def compile(self) -> bool:
        return self.engine.compile

    @property
    def sync_every(self) -> int:
        return self.engine.sync_every

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def check_context(self, n_prompt: int, max_new_tokens: int) -> None:
        check_context(n_prompt, max_new_tokens, self.max_seq_length)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Complete each prompt; returns one Completion per prompt, in order."""
        batch = [self.encode_prompt(p) for p in _as_batch(prompts)]
        texts: dict[int, list[str]] = {i: [] for i in range(len(batch))}
        token_ids: dict[int, list[int]] = {i: [] for i in range(len(batch))}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(batch))}
        prompt_lps: dict[int, list[TokenLogprob | None]] = {}
        done: dict[int, Completion] = {}
        for deltas in self.stream(batch, params):
            for d in deltas:
                texts[d.index].append(d.text)
                token_ids[d.index].extend(d.token_ids)
                if d.logprobs is not None:
                    logprobs[d.index].extend(d.logprobs)
                if d.prompt_logprobs is not None:
                    prompt_lps[d.index] = d.prompt_logprobs
                if d.finish_reason is not None:
                    done[d.index] = Completion(d.index, "".join(texts[d.index]), token_ids[d.index], d.finish_reason,
                                               len(batch[d.index]),
                                               logprobs[d.index] if d.logprobs is not None else None,
                                               prompt_lps.get(d.index))
        return [done[i] for i in range(len(batch))]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[list[Delta]]:
        """Yield, after each engine step, the deltas of rows that produced something. Raises ValueError /
        ContextLengthError for a bad request before any row runs.

        Closing the iterator (a client that went away) stops the generation at once.
        """
        out = self.engine.submit_all(_as_batch(prompts), params)
        was_training = self.model.training
        self.model.eval()  # no dropout in generation, even from a model straight out of training
        try:
            with merged_projections(self.model):  # checked once for the run; the engine's steps re-enter it
                while not out.finished:
                    with torch.inference_mode():  # per step: the caller's code between deltas runs as it would
                        self.engine.step()
                    deltas = out.ready()
                    if deltas:
                        yield deltas
        finally:
            out.cancel()
            self.engine.drop_cancelled()
            self.model.train(was_training)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if len(prompts) and isinstance(prompts[0], int):
        return [list(prompts)]  # type: ignore[arg-type]  # one prompt given as token ids
    return list(prompts)  # type: ignore[arg-type]


# One Generator per model for the transformers-style `model.generate`: its engine keeps the KV cache and, on a GPU,
# the compiled step's captured graphs from one call to the next.
_GENERATORS: weakref.WeakKeyDictionary[Llama, Generator] = weakref.WeakKeyDictionary()


def _generator_for(model: Llama, tokenizer: Tokenizer | None) -> Generator:
    max_seq_length = getattr(model, "max_seq_length", None)
    gen = _GENERATORS.get(model)
    if gen is None or gen.tokenizer is not tokenizer or gen.max_seq_length != min(
            max_seq_length or model.config.max_position_embeddings, model.config.max_position_embeddings):
        gen = _GENERATORS[model] = Generator(model, tokenizer, max_seq_length=max_seq_length)
    return gen


def generate(model: Llama, tokenizer: Tokenizer | None, prompts: Prompt | Sequence[Prompt],
             params: SamplingParams | None = None) -> list[Completion]:
    """One-shot convenience around `Generator`."""
    return Generator(model, tokenizer).generate(prompts, params or SamplingParams())


# transformers' `generate` arguments we cannot honour, with the value that means "off": that value is accepted
# (notebooks pass some of them explicitly), any other is refused by name, never silently ignored.
NEUTRAL_GENERATE_ARGS: dict[str, Any] = {
    "num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "early_stopping": False, "length_penalty": 1.0,
    "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "output_scores": False, "output_logits": False, "output_attentions": False,
    "output_hidden_states": False, "return_dict_in_generate": False, "generation_config": None,
    "logits_processor": None, "stopping_criteria": None, "bad_words_ids": None, "force_words_ids": None,
    "prefix_allowed_tokens_fn": None, "assistant_model": None, "synced_gpus": False, "penalty_alpha": None,
    "token_type_ids": None,
}


def generate_ids(model: Llama, input_ids: Tensor | Mapping[str, Tensor], attention_mask: Tensor | None = None, *,
                 max_new_tokens: int | None = None, max_length: int | None = None, min_new_tokens: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 50,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, use_cache: bool = True,  # noqa: ARG001 (see the docstring)
                 streamer: Any = None,
                 seed: int | None = None, tokenizer: Tokenizer | None = None, **unsupported: Any) -> Tensor:
    """transformers-style `generate`: (B, T) ids in (left padding marked by `attention_mask`), (B, T + new) out,
    each row's stop token kept as transformers keeps it, rows that stop early padded with `pad_token_id` (default:
    the first EOS id). transformers' defaults: greedy unless `do_sample`, `top_k` 50 when sampling, 20 new tokens
    unless `max_new_tokens` (or the total `max_length`) says otherwise; with `do_sample` and no `seed`, the seed is
    drawn from torch's generator, so `torch.manual_seed` makes a run repeatable as it does there. `input_ids` may be
    the mapping `tokenizer(...)` / `apply_chat_template(..., return_dict=True)` return. `use_cache` changes nothing
    (the KV cache is always used). `streamer`: transformers' protocol (`put` the prompt, then each token; `end`)."""
    _refuse(unsupported)
    if isinstance(input_ids, Mapping):
        mapping = input_ids
        input_ids, attention_mask = mapping["input_ids"], mapping.get("attention_mask", attention_mask)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if streamer is not None and input_ids.size(0) != 1:
        raise ValueError("a streamer takes one sequence: generate with a batch of one")
    new = max_new_tokens if max_new_tokens is not None else (max_length - input_ids.size(1) if max_length else 20)
    if new < 1:
        raise ValueError(f"max_length={max_length} leaves no room after the prompt's {input_ids.size(1)} tokens")
    if do_sample and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    stop = [eos_token_id] if isinstance(eos_token_id, int) else (list(eos_token_id) if eos_token_id is not None
                                                                 else None)
    params = SamplingParams(max_new_tokens=new, min_new_tokens=min_new_tokens, top_p=top_p, top_k=top_k if do_sample
                            else 0, temperature=temperature if do_sample else 0.0, min_p=min_p, seed=seed,
                            repetition_penalty=repetition_penalty, stop_token_ids=stop)
    gen = _generator_for(model, tokenizer)
    out = _run(gen, _prompt_rows(input_ids, attention_mask), params, streamer, input_ids)
    eos_ids = stop if stop is not None else sorted(gen.engine.eos | set(tokenizer.eos_token_ids if tokenizer else ()))
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    width = max(len(ids) for ids in out)
    tail = torch.tensor([ids + [pad] * (width - len(ids)) for ids in out], dtype=input_ids.dtype,
                        device=input_ids.device)
    return torch.cat([input_ids, tail], dim=1)


def _refuse(unsupported: dict[str, Any]) -> None:
    unknown = sorted(set(unsupported) - NEUTRAL_GENERATE_ARGS.keys())
    if unknown:
        raise TypeError(f"generate got unsupported argument(s): {', '.join(unknown)}")
    for name, value in unsupported.items():
        if value != NEUTRAL_GENERATE_ARGS[name]:
            raise ValueError(f"generate: {name}={value!r} is not supported by this engine (only "
                             f"{NEUTRAL_GENERATE_ARGS[name]!r}: greedy or sampled decoding of one sequence per row)")


def _prompt_rows(input_ids: Tensor, attention_mask: Tensor | None) -> list[list[int]]:
    if attention_mask is None:
        return [row.tolist() for row in input_ids]
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]


def _run(gen: Generator, rows: list[list[int]], params: SamplingParams, streamer: Any, input_ids: Tensor
         ) -> list[list[int]]:
    """Each row's new ids, its stop token included when it stopped on one; the streamer hears them as they come."""
    new: list[list[int]] = [[] for _ in rows]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for deltas in gen.stream(rows, params):
        for d in deltas:
            ids = d.token_ids + ([d.stop_token_id] if d.finish_reason == "stop" and d.stop_token_id is not None
                                 else [])
            new[d.index].extend(ids)
            if streamer is not None and ids:
                streamer.put(torch.tensor(ids))
    if streamer is not None:
        streamer.end()
    return new
