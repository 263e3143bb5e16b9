"""Generation on the caller's thread: a synchronous driver over the serving engine's step.

There is one generation engine (serving.BatchEngine): the API serves from it on its own thread, and `Generator`,
`generate`, `model.generate` and `unsloth generate` run the same step on the caller's thread, so prompt encoding,
per-row checks, the context clamp, EOS handling, prefill, the compiled decode step and the per-row emit are written
once.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

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
        done: dict[int, Completion] = {}
        for deltas in self.stream(batch, params):
            for d in deltas:
                texts[d.index].append(d.text)
                token_ids[d.index].extend(d.token_ids)
                if d.logprobs is not None:
                    logprobs[d.index].extend(d.logprobs)
                if d.finish_reason is not None:
                    done[d.index] = Completion(d.index, "".join(texts[d.index]), token_ids[d.index], d.finish_reason,
                                               len(batch[d.index]),
                                               logprobs[d.index] if d.logprobs is not None else None)
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


def generate_ids(model: Llama, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0, repetition_penalty: float = 1.0, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, seed: int | None = None, tokenizer: Tokenizer | None = None
                 ) -> Tensor:
    """transformers-style `generate`: (B, T) ids in (left padding marked by `attention_mask`), (B, T + new) out,
    rows that stop early padded with `pad_token_id` (default: the first EOS id)."""
    rows = [ids[mask.bool()].tolist() if attention_mask is not None else ids.tolist()
            for ids, mask in zip(input_ids, attention_mask if attention_mask is not None else input_ids)]
    stop = [eos_token_id] if isinstance(eos_token_id, int) else (list(eos_token_id) if eos_token_id is not None
                                                                 else None)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                            top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                            stop_token_ids=stop)
    out = _generator_for(model, tokenizer).generate(rows, params)
    eos_ids = stop if stop is not None else model.config.eos_token_ids
    pad = pad_token_id if pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    width = max(len(c.token_ids) + (c.finish_reason == "stop") for c in out)
    new = [c.token_ids + ([eos_ids[0]] if c.finish_reason == "stop" and eos_ids else []) for c in out]
    tail = torch.tensor([n + [pad] * (width - len(n)) for n in new], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, tail], dim=1)

