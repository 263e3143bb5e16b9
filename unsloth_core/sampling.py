"""Sampling: turn next-token logits into tokens, with per-row parameters and no host sync.

Every knob is a per-row tensor so one batch can mix requests (greedy next to sampled, different penalties).
A random choice inverts the row's cumulative distribution at one uniform draw: the first token whose cumulative
probability exceeds u. That is one random number per row, where an exponential race over the vocabulary draws one
per token (on a CPU that noise cost 1.2 of the 1.5 ms a row took); and unlike `torch.multinomial` it never waits on
the device. The cumulative sum is in fp64, so a 128k vocabulary's tail keeps its probabilities. Each row draws from
its own generator, so a seed reproduces a row's sample whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from unsloth_core.constrained import Constraint


@dataclass
class SamplingParams:
    """What a caller may ask of one generation (OpenAI's and HF's knobs, with their defaults)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0  # HF's: the stop token ids (EOS) cannot be chosen before this many tokens
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence among generated tokens
    repetition_penalty: float = 1.0  # HF: divide positive / multiply negative logits of tokens seen (prompt too)
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] | None = None  # None: the model's EOS ids
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the n most likely
    # vLLM's: each prompt token's logprob given the tokens before it (the first has none), and the n most likely
    # there; with max_new_tokens 0 the request only scores its prompt (log-likelihood evaluation)
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None  # a grammar the output must match (constrained.py)
    skip_special_tokens: bool = True
    logit_bias: Mapping[int, float] | None = None  # OpenAI's: added to a token's logit before sampling, -100..100

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens must be >= 0"),
            (self.min_new_tokens >= 0, "min_new_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "prompt_logprobs must be between 0 and 20"),
            (self.seed is None or -2**63 <= self.seed < 2**64, "seed must fit in 64 bits"),
            (all(t >= 0 and -100 <= b <= 100 for t, b in (self.logit_bias or {}).items()),
             "logit_bias must map token ids to values between -100 and 100"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Per-row sampling state for a batch: parameters as tensors, token counts for the penalties, generators.

    `stop_ids`: each row's ids that end it (its EOS and stop tokens), masked while the row has generated fewer than
    its `min_new_tokens`; needed when any row asks for a minimum."""

    def __init__(self, params: Sequence[SamplingParams], vocab_size: int, device: torch.device,
                 stop_ids: Sequence[Collection[int]] | None = None) -> None:
        def col(values: list[float]) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # (B, 1)

        self.temperature = col([p.temperature for p in params])
        self.greedy = self.temperature == 0
        self.top_k = torch.tensor([p.top_k or vocab_size for p in params], device=device)[:, None]
        self.top_p, self.min_p = col([p.top_p for p in params]), col([p.min_p for p in params])
        self.presence, self.frequency = col([p.presence_penalty for p in params]), col([p.frequency_penalty
                                                                                          for p in params])
        self.repetition = col([p.repetition_penalty for p in params])
        self.any_sampling = any(not p.greedy for p in params)
        self.any_filter = any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params)
        self.any_count_penalty = any(p.presence_penalty or p.frequency_penalty for p in params)
        self.any_repetition = any(p.repetition_penalty != 1 for p in params)
        b = len(params)
        self.bias: Tensor | None = None  # (B, V), where any row has a logit_bias
        if any(p.logit_bias for p in params):
            self.bias = torch.zeros(b, vocab_size, dtype=torch.float32)
            for row, p in enumerate(params):
                for token, value in (p.logit_bias or {}).items():
                    if token >= vocab_size:
                        raise ValueError(f"logit_bias names token {token}, outside the vocabulary of {vocab_size}")
                    self.bias[row, token] = value
            self.bias = self.bias.to(device)
        self.counts = torch.zeros(b, vocab_size, dtype=torch.float32, device=device)  # generated tokens
        self.seen = torch.zeros(b, vocab_size, dtype=torch.bool, device=device)  # prompt + generated
        self.generators = [self._generator(p.seed, device) for p in params]
        self.steps = 0  # tokens chosen so far: `sample` is called once per token for every row
        self.min_new = max((p.min_new_tokens for p in params), default=0)
        self.stop_mask: Tensor | None = None  # (B, V): each row's stop ids, while some row is under its minimum
        self.min_new_col = col([float(p.min_new_tokens) for p in params])
        if self.min_new:
            if stop_ids is None or len(stop_ids) != b:
                raise ValueError("min_new_tokens needs each row's stop token ids")
            self.stop_mask = torch.zeros(b, vocab_size, dtype=torch.bool)
            for row, ids in enumerate(stop_ids):
                self.stop_mask[row, [i for i in ids if 0 <= i < vocab_size]] = True
            self.stop_mask = self.stop_mask.to(device)

    @staticmethod
    def _generator(seed: int | None, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(seed)
        return g

    def observe_prompt(self, row: int, token_ids: Sequence[int]) -> None:
        if token_ids:
            self.seen[row, torch.tensor(list(token_ids), device=self.seen.device)] = True

    def observe(self, tokens: Tensor) -> None:
        """Record the tokens (B,) just chosen, for the penalties of the next steps."""
        ones = torch.ones_like(tokens, dtype=self.counts.dtype)[:, None]
        self.counts.scatter_add_(1, tokens[:, None], ones)
        self.seen.scatter_(1, tokens[:, None], True)

    def penalize(self, logits: Tensor) -> Tensor:
        if self.stop_mask is not None and self.steps < self.min_new:
            # As transformers' MinNewTokensLengthLogitsProcessor: the stop ids' logits are -inf while under minimum.
            under = self.min_new_col > self.steps  # (B, 1)
            logits = logits.masked_fill(self.stop_mask & under, float("-inf"))
        if self.bias is not None:
            logits = logits + self.bias
        if self.any_repetition:
            penalized = torch.where(logits > 0, logits / self.repetition, logits * self.repetition)
            logits = torch.where(self.seen, penalized, logits)
        if self.any_count_penalty:
            logits = logits - self.frequency * self.counts - self.presence * (self.counts > 0).float()
        return logits

    def filter(self, logits: Tensor) -> Tensor:
        """Apply temperature, then top-k, top-p and min-p by setting excluded logits to -inf."""
        logits = logits / torch.where(self.greedy, 1.0, self.temperature)
        if not self.any_filter:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.size(-1), device=logits.device)[None, :]
        probs = sorted_logits.softmax(-1)
        drop = rank >= self.top_k
        drop |= (probs.cumsum(-1) - probs) >= self.top_p  # keep the smallest prefix reaching top_p (at least one)
        drop |= probs < self.min_p * probs[:, :1]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    def sample(self, logits: Tensor) -> Tensor:
        """Next tokens (B,) from fp32 logits (B, V)."""
        logits = self.penalize(logits)
        choice = logits.argmax(-1)
        if self.any_sampling:
            cdf = self.filter(logits).softmax(-1).double().cumsum(-1)  # (B, V)
            u = torch.stack([torch.rand((1,), generator=g, device=cdf.device, dtype=cdf.dtype)
                             for g in self.generators])  # (B, 1)
            # right=True: the first token whose cumulative probability is above u (a zero-probability token never)
            sampled = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp_(max=cdf.size(-1) - 1)
            choice = torch.where(self.greedy[:, 0], choice, sampled)
        if self.any_count_penalty or self.any_repetition:
            self.observe(choice)
        self.steps += 1
        return choice

    @property
    def plain_greedy(self) -> bool:
        """Every row takes the argmax of the raw logits (no temperature, filters or penalties)."""
        return not (self.any_sampling or self.any_count_penalty or self.any_repetition or self.bias is not None
                    or self.steps < self.min_new)
