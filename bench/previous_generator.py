"""The generation loop `Generator` ran before it became a driver over the serving engine (unsloth_core/serving.py),
kept here, in bench/ only, so the decode rows can set the one engine side by side with it in one run
(`python -m bench.profile --only decode_ab`). Not part of the product: nothing outside bench/ imports it.

Its own static-batch loop: left-padded prefill of the whole batch, a decode step compiled once per (batch, cache)
shape (CUDA graphs captured by unsloth_core/cuda_graphs.py, or torch.compile's graph trees), tokens read back every
`sync_every` steps, the next step queued before the read-back on a GPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
import torch._dynamo
from torch import Tensor

from unsloth_core.cuda_graphs import GraphedStep, addresses
from unsloth_core.merged import merged_projections
from unsloth_core.model import Llama, cache_slots
from unsloth_core.request_state import (
    Completion,
    Delta,
    Prompt,
    RowState,
    TokenLogprob,
    check_context,
    step_logprobs,
    token_logprob,
)
from unsloth_core.sampling import Sampler, SamplingParams
from unsloth_core.tokenizer import Tokenizer

COMPILED_SHAPES = 32


class PreviousGenerator:
    """The previous design's Generator, whole: a static batch, left-padded, decoded to its end."""

    def __init__(self, model: Llama, tokenizer: Tokenizer | None, compile: bool | None = None,
                 max_seq_length: int | None = None, sync_every: int = 8) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_length = min(max_seq_length or model.config.max_position_embeddings,
                                  model.config.max_position_embeddings)
        self.compile = model.device.type == "cuda" if compile is None else compile
        self.sync_every = sync_every if self.compile else 1
        # On a GPU, compiled: "manual" replays graphs cuda_graphs.py captures; "tree" is torch.compile's
        # reduce-overhead mode (the earlier design, kept for the bench's side-by-side).
        self.cuda_graphs: Literal["manual", "tree"] = "manual"
        self._decode: Callable[..., Tensor] | None = None
        self._graphs: GraphedStep | None = None
        self._addresses: tuple[int, ...] = ()

    # ---- the model steps ----

    def _prefill(self, tokens: Tensor, slot_mask: Tensor, positions: Tensor) -> Tensor:
        t = tokens.size(1)
        input_pos = torch.arange(t, device=tokens.device)
        hidden = self.model.hidden_states(tokens, positions, slot_mask[:, :t], input_pos)
        return self.model.lm_head(hidden[:, -1]).float()  # only the last position's logits are needed

    def _decode_step(self, tokens: Tensor, input_pos: Tensor, positions: Tensor, slot_mask: Tensor) -> Tensor:
        hidden = self.model.hidden_states(tokens, positions, slot_mask, input_pos)
        return self.model.lm_head(hidden[:, -1]).float()

    def _decoder(self) -> Callable[..., Tensor]:
        if self._decode is None:
            fn: Callable[..., Tensor] = self._decode_step
            if self.compile:
                config = torch._dynamo.config
                config.recompile_limit = max(config.recompile_limit, COMPILED_SHAPES)
                if self.model.device.type == "cuda" and self.cuda_graphs == "manual":
                    self._graphs = GraphedStep(torch.compile(fn, fullgraph=True, dynamic=False), COMPILED_SHAPES)
                    fn = self._graphs
                else:
                    fn = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
            self._decode = fn
        return self._decode

    def _check_graphs(self) -> None:
        """Drop captured graphs whose weights or cache have moved (a new cache, converted or re-merged weights)."""
        if self.compile and self.model.device.type == "cuda" and self.cuda_graphs == "manual":
            where = addresses(self.model)
            if where != self._addresses and self._graphs is not None:
                self._graphs.reset()
            self._addresses = where

    def _decode_next(self, *args: Tensor) -> Tensor:
        """One decode step; compiled, the logits are copied out of the CUDA graph's output buffer, which the next
        replay overwrites. A shape past the compile limit runs eagerly from then on."""
        if not self.compile:
            return self._decoder()(*args)
        try:
            return self._decoder()(*args).clone()
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn(f"the decode step is compiled for {COMPILED_SHAPES} (batch, cache) shapes already; "
                          "this PreviousGenerator decodes eagerly from now on", RuntimeWarning, stacklevel=2)
            self._decode = self._decode_step
            return self._decode_step(*args)

    # ---- public API ----

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; give token ids")
        return self.tokenizer.encode(prompt)

    def check_context(self, n_prompt: int, max_new_tokens: int) -> None:
        check_context(n_prompt, max_new_tokens, self.max_seq_length)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Complete each prompt; returns one Completion per prompt, in order."""
        batch = self._as_batch(prompts)
        texts: dict[int, list[str]] = {i: [] for i in range(len(batch))}
        done: dict[int, Completion] = {}
        logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(batch))}
        token_ids: dict[int, list[int]] = {i: [] for i in range(len(batch))}
        for deltas in self.stream(batch, params):
            for d in deltas:
                texts[d.index].append(d.text)
                token_ids[d.index].extend(d.token_ids)
                if d.logprobs is not None:
                    logprobs[d.index].extend(d.logprobs)
                if d.finish_reason is not None:
                    done[d.index] = Completion(d.index, "".join(texts[d.index]), token_ids[d.index], d.finish_reason,
                                               len(self.encode_prompt(batch[d.index])),
                                               logprobs[d.index] if d.logprobs is not None else None)
        return [done[i] for i in range(len(batch))]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[list[Delta]]:
        """Yield, after each decode step, the deltas of rows that produced something.

        Closing the iterator (a client that went away) stops the generation at the next step.
        """
        batch = self._as_batch(prompts)
        params = params or SamplingParams()
        per_row = [params] * len(batch) if isinstance(params, SamplingParams) else list(params)
        if len(per_row) != len(batch):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [self.encode_prompt(p) for p in batch]
        for row_ids, p in zip(ids, per_row):
            self.check_context(len(row_ids), p.max_new_tokens)
            if p.stop and self.tokenizer is None:
                raise ValueError("stop strings need a tokenizer")
        was_training = self.model.training
        self.model.eval()  # no dropout in generation, even from a model straight out of training
        try:
            with torch.inference_mode(), merged_projections(self.model):
                yield from self._run(ids, per_row)
        finally:
            self.model.train(was_training)

    @staticmethod
    def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if len(prompts) and isinstance(prompts[0], int):
            return [list(prompts)]  # type: ignore[arg-type]  # one prompt given as token ids
        return list(prompts)  # type: ignore[arg-type]

    # ---- the loop ----

    def _setup(self, batch_size: int, n_slots: int) -> int:
        """Make sure a cache of at least (batch_size, n_slots) exists; return its slot count.

        Compiled, the slot count is rounded up to a power of two (at least 256): a few static shapes, each captured
        once, instead of one per length, and never the model's whole context (131k slots for Llama 3) unless asked.
        Eager, the cache fits the request, reallocated only when far too big or too small.
        """
        if self.compile:
            n_slots = min(self.max_seq_length, max(256, 1 << (n_slots - 1).bit_length()))
            n_slots = cache_slots(n_slots)  # as setup_caches rounds it, or every call would reallocate
        shape = self.model.cache_shape
        too_big = not self.compile and shape is not None and shape[1] > 2 * n_slots + 64
        if shape is None or shape[0] != batch_size or shape[1] < n_slots or too_big or (
                self.compile and shape[1] != n_slots):
            self.model.setup_caches(batch_size, n_slots)
            shape = self.model.cache_shape
            assert shape is not None
        return shape[1]

    def _run(self, ids: list[list[int]], params: list[SamplingParams]) -> Iterator[list[Delta]]:
        dev, b = self.model.device, len(ids)
        t = max(len(x) for x in ids)
        max_new = max(p.max_new_tokens for p in params)
        n_slots = self._setup(b, t + max_new)
        self._check_graphs()
        # Left-pad so every row's next token lands in the same cache slot.
        pad = [t - len(x) for x in ids]
        tokens = torch.tensor([[0] * p + x for p, x in zip(pad, ids)], device=dev)
        slot_mask = torch.zeros(b, n_slots, dtype=torch.bool, device=dev)
        for i, p in enumerate(pad):
            slot_mask[i, p:t] = True
        positions = (slot_mask[:, :t].long().cumsum(-1) - 1).clamp(min=0)
        next_pos = positions[:, -1:] + 1  # (B, 1)
        # Each decode step's slot and positions are derived on the device from these. A tensor built from host data
        # every step (torch.tensor([slot], device="cuda")) is a blocking copy: the host would wait for the GPU on
        # every token, and the compiled step could never run ahead of it.
        first_slot = torch.full((1,), t, device=dev)
        eos = set(self.model.config.eos_token_ids) | set(self.tokenizer.eos_token_ids if self.tokenizer else ())
        rows = [RowState(i, self.tokenizer, p, set(p.stop_token_ids) if p.stop_token_ids is not None else eos)
                for i, p in enumerate(params)]
        sampler = Sampler(params, self.model.config.vocab_size, dev)
        for i, x in enumerate(ids):
            sampler.observe_prompt(i, x)
        want_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=None)

        def decode(step: int, chosen: Tensor) -> Tensor:
            slot = t + step
            slot_mask[:, slot].fill_(True)  # not `= True`: that makes a host tensor
            width = n_slots if self.compile else slot + 1
            return self._decode_next(chosen[:, None], first_slot + step, next_pos + step, slot_mask[:, :width])

        # On a GPU the next step is queued before tokens are read back, so the device works while the host reads
        # and emits. On the CPU that would only delay each delta by a step.
        ahead = dev.type == "cuda"
        logits = self._prefill(tokens, slot_mask, positions)
        pending: list[tuple[Tensor, Tensor | None]] = []
        for step in range(max_new):
            chosen = sampler.sample(logits)
            pending.append((chosen, step_logprobs(logits, chosen, want_logprobs)))
            last = step == max_new - 1
            if ahead and not last:
                logits = decode(step, chosen)
            if len(pending) >= self.sync_every or last:
                deltas = self._emit(rows, pending, params)
                pending = []
                if deltas:
                    yield deltas
                if all(r.finish is not None for r in rows):
                    return
            if not ahead and not last:
                logits = decode(step, chosen)

    def _emit(self, rows: list[RowState], pending: list[tuple[Tensor, Tensor | None]],
              params: list[SamplingParams]) -> list[Delta]:
        tokens = torch.stack([c for c, _ in pending], dim=1).tolist()  # one host sync per `sync_every` steps
        lps = [lp.tolist() if lp is not None else None for _, lp in pending]
        deltas = []
        for row in rows:
            if row.finish is not None:
                continue
            new_ids: list[int] = []
            new_lps: list[TokenLogprob] | None = [] if params[row.index].logprobs is not None else None
            for j, tok in enumerate(tokens[row.index]):
                before = len(row.token_ids)
                row.push(tok)
                if len(row.token_ids) > before:
                    new_ids.append(tok)
                    step_lps = lps[j]
                    if new_lps is not None and step_lps is not None:
                        new_lps.append(token_logprob(self.tokenizer, tok, step_lps[row.index],
                                                     params[row.index].logprobs or 0))
                if row.finish is not None:
                    break
            text = row.take()
            if text or new_ids or row.finish is not None:
                deltas.append(Delta(row.index, text, new_ids, new_lps, row.finish))
        return deltas
