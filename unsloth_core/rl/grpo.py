"""GRPO as a training method: sample a group of completions per prompt on the live weights, score, train.

Each accumulation window takes a batch of prompts and:
1. samples `num_generations` completions per prompt with our generation engine (batched, KV-cached) from the model
   being trained: the same object, its adapters as they are now, in eval mode with no gradients; the KV cache is
   freed afterwards and the train-mode and checkpointing flags put back;
2. scores them with the reward functions (rewards.py) and normalises the rewards within each group (grpo_loss.py);
3. with `beta` > 0, computes the reference policy's log-probabilities: the same model with its adapters switched
   off (no second copy of the weights; a frozen copy only for full fine-tuning);
4. trains on the completions in micro-batches of `micro_batch_size` rows with the clipped GRPO loss.
With `num_iterations` > 1 the same rollout is trained on for that many optimizer steps, each one's ratio taken
against the log-probabilities of the first (PPO's reuse); those are the first iteration's own forward, detached.

Sampling is seeded per completion from (seed, step, row), not from a running generator, so a run resumed from a
checkpoint samples the same completions; a rollout still being reused when a checkpoint is written is saved with it.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from unsloth_core.generate import Generator
from unsloth_core.lora import reference_policy
from unsloth_core.method import Method, MethodState
from unsloth_core.model import Llama
from unsloth_core.rl.grpo_loss import (
    GRPOLossConfig,
    LossType,
    ScaleRewards,
    combine_rewards,
    completion_mask,
    group_advantages,
    grpo_loss,
)
from unsloth_core.rl.logprobs import completion_logprobs
from unsloth_core.rl.prompts import PromptExample, TokenizedPrompt, load_prompts, tokenize_prompt
from unsloth_core.rl.rewards import RewardFunc, reward_metrics, reward_name, score
from unsloth_core.sampling import SamplingParams

if TYPE_CHECKING:
    from unsloth_core.tokenizer import Tokenizer
    from unsloth_core.trainer import TrainArgs, Trainer


@dataclass
class GRPOArgs:
    """GRPO's own knobs, named and defaulted as TRL's GRPOConfig (1.16). The rest of a run (learning rate, steps,
    checkpoints) is TrainArgs'; there `micro_batch_size` counts completions, and a window's completions
    (micro_batch_size x gradient_accumulation_steps) are a whole number of groups."""

    num_generations: int = 8  # completions per prompt (a group)
    max_completion_length: int = 512
    max_prompt_length: int | None = None  # None: whatever leaves room for the completion in max_seq_length
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    beta: float = 0.0  # KL coefficient; 0 skips the reference policy's forward
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: epsilon (DAPO's clip-higher when larger)
    loss_type: LossType = "dapo"
    scale_rewards: ScaleRewards = "group"
    num_iterations: int = 1
    mask_truncated_completions: bool = False
    use_bias_correction_kl: bool = True
    reward_weights: list[float] | None = None  # one per reward function; None: all 1
    log_rollouts: int = 2  # prompts (each with its group of completions) handed to on_rollouts per logged step
    eval_samples: int | None = None  # held-out prompts scored per evaluation (the first ones); None: all

    def __post_init__(self) -> None:
        checks = [
            (self.num_generations >= 2, "num_generations must be at least 2 (advantages compare a group's "
                                        "completions with each other)"),
            (self.max_completion_length >= 1, "max_completion_length must be at least 1"),
            (self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length must be at least 1"),
            (self.temperature > 0, "temperature must be positive (GRPO samples; 0 would make a group's "
                                   "completions identical)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be positive"),
            (self.num_iterations >= 1, "num_iterations must be at least 1"),
            (self.log_rollouts >= 0, "log_rollouts must be >= 0"),
            (self.eval_samples is None or self.eval_samples >= 1, "eval_samples must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.loss_config()  # loss_type, beta, epsilons

    def loss_config(self) -> GRPOLossConfig:
        return GRPOLossConfig(loss_type=self.loss_type, beta=self.beta, epsilon=self.epsilon,
                              epsilon_high=self.epsilon_high, max_completion_length=self.max_completion_length,
                              use_bias_correction_kl=self.use_bias_correction_kl)


@dataclass
class Rollout:
    """One window's completions, scored: what the optimizer steps train on (num_iterations of them)."""

    sequences: Tensor  # (rows, T) prompt + completion (its stop token included), right-padded; on the device
    starts: list[int]  # where each row's completion begins
    lengths: list[int]  # its completion tokens
    mask: Tensor  # (rows, W) 1.0 on the tokens that count (completion_mask)
    advantages: Tensor  # (rows,)
    ref_logps: Tensor | None  # (rows, W), with beta > 0
    metrics: dict[str, float]
    samples: list[dict[str, Any]]  # for on_rollouts
    old_logps: Tensor | None = None  # (rows, W): the first iteration's, when there are more
    uses: int = 0  # optimizer steps taken on it
    reported: bool = False  # its samples went to on_rollouts
    times: dict[str, float] = field(default_factory=dict)

    def to(self, device: torch.device) -> Rollout:
        """The tensors on `device` (a rollout read from a checkpoint comes on the CPU)."""
        for name in ("sequences", "mask", "advantages", "ref_logps", "old_logps"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


class GRPO(Method):
    """Group Relative Policy Optimization (Shao et al., 2024) with reward functions in TRL's signature.

    `tokenizer` None: the one the training data is tokenized with (finetune passes it to `tokenize`).
    Metrics per step, TRL's names: reward, reward_std, rewards/<func>/mean|std, frac_reward_zero_std, kl (beta > 0),
    entropy, clip_ratio/low_mean|high_mean|region_mean, completions/mean_length|min_length|max_length|
    clipped_ratio|mean_terminated_length; and ours: time/generation_s, time/reward_s, time/reference_s,
    time/training_s (this step's), loss.
    """

    name = "grpo"

    def __init__(self, reward_funcs: RewardFunc | Sequence[RewardFunc], args: GRPOArgs | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not funcs or not all(callable(f) for f in funcs):
            raise ValueError("GRPO needs at least one reward function (a callable taking prompts and completions)")
        self.reward_funcs: list[RewardFunc] = funcs
        self.args = args or GRPOArgs()
        weights = self.args.reward_weights
        if weights is not None and len(weights) != len(funcs):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions")
        self.weights = torch.tensor(weights if weights is not None else [1.0] * len(funcs), dtype=torch.float32)
        self.names = _unique([reward_name(f) for f in funcs])
        self.tokenizer = tokenizer
        self.rollout: Rollout | None = None
        self.reference: Llama | None = None  # full fine-tuning with beta > 0: a frozen copy
        self._generator: Generator | None = None

    @classmethod
    def from_args(cls, args: TrainArgs) -> GRPO:
        raise ValueError("method 'grpo' needs reward functions: give the Trainer (or finetune) "
                         "method=GRPO(reward_funcs, GRPOArgs(...)) with args.method='grpo'")

    # ---- data ----

    def load(self, source: str | Path, tokenizer: Tokenizer, args: TrainArgs, role: str = "training") -> list[Any]:
        return load_prompts(source, tokenizer, role)

    def tokenize(self, examples: Sequence[Any], tokenizer: Tokenizer, args: TrainArgs) -> list[Any]:
        self.tokenizer = self.tokenizer or tokenizer
        room = args.max_seq_length - self.args.max_completion_length
        if room < 1:
            raise ValueError(f"max_seq_length ({args.max_seq_length}) leaves no room for a prompt before "
                             f"max_completion_length ({self.args.max_completion_length}) tokens")
        limit = min(room, self.args.max_prompt_length or room)
        return [tokenize_prompt(e, tokenizer, limit) for e in examples if isinstance(e, PromptExample)]

    def n_tokens(self, item: Any) -> int:
        return len(item)

    # ---- the loop's shape ----

    def batch_shape(self, args: TrainArgs) -> tuple[int, int]:
        completions = args.micro_batch_size * args.gradient_accumulation_steps
        if completions % self.args.num_generations:
            raise ValueError(f"a window's completions (micro_batch_size x gradient_accumulation_steps = "
                             f"{args.micro_batch_size} x {args.gradient_accumulation_steps} = {completions}) must be "
                             f"a multiple of num_generations ({self.args.num_generations})")
        return completions // self.args.num_generations, 1  # prompts per window, one batch of them

    @property
    def steps_per_window(self) -> int:
        return self.args.num_iterations

    def needs_window(self, step: int) -> bool:
        return self.rollout is None or self.rollout.uses >= self.args.num_iterations

    def setup(self, trainer: Trainer) -> None:
        if self.tokenizer is None:
            raise ValueError("GRPO needs the tokenizer to decode completions: GRPO(..., tokenizer=tokenizer)")
        if self.args.beta > 0 and trainer.model.lora_config is None and self.reference is None:
            self.reference = copy.deepcopy(trainer.model).eval().requires_grad_(False)

    def generator(self, trainer: Trainer) -> Generator:
        """One engine for the run: on a GPU its compiled step is captured once, not per rollout."""
        if self._generator is None:
            rows = trainer.batch_items * self.args.num_generations
            self._generator = Generator(trainer.model, self.tokenizer, max_seq_length=trainer.args.max_seq_length,
                                        max_batch_size=max(rows, 1))
        return self._generator

    # ---- one window ----

    def train_window(self, trainer: Trainer, window: list[Any] | None) -> dict[str, Any]:
        if window is not None:
            self.rollout = self._rollout(trainer, window[0], trainer.state.step)
        assert self.rollout is not None
        rollout = self.rollout.to(trainer.device)
        start = time.perf_counter()
        metrics = self._optimize(trainer, rollout)
        first = rollout.uses == 0
        rollout.uses += 1
        step = trainer.state.step + 1
        if not rollout.reported and (step % trainer.args.logging_steps == 0 or step == trainer.total_steps):
            from unsloth_core.trainer import RolloutCallbacks

            if isinstance(trainer.callbacks, RolloutCallbacks) and rollout.samples:
                trainer.callbacks.on_rollouts(step, rollout.samples)
            rollout.reported = True
        times = rollout.times if first else {}
        return {**metrics, **rollout.metrics, "time/generation_s": times.get("generation", 0.0),
                "time/reward_s": times.get("reward", 0.0), "time/reference_s": times.get("reference", 0.0),
                "time/training_s": time.perf_counter() - start}

    def _rollout(self, trainer: Trainer, prompts: list[TokenizedPrompt], step: int) -> Rollout:
        a, g = self.args, self.args.num_generations
        rows = [p for p in prompts for _ in range(g)]
        t0 = time.perf_counter()
        completions = self._sample(trainer, [r.ids for r in rows], self._seeds(trainer, "train", step, len(rows)))
        t1 = time.perf_counter()
        per_func = self._score(rows, completions)
        rewards = combine_rewards(per_func, self.weights)
        advantages = group_advantages(rewards, g, a.scale_rewards)
        t2 = time.perf_counter()
        starts = [len(r.ids) for r in rows]
        lengths = [len(c.ids) for c in completions]
        sequences = _right_pad([r.ids + c.ids for r, c in zip(rows, completions)], trainer.pad_id)
        sequences = sequences.to(trainer.device)
        truncated = torch.tensor([c.finish_reason == "length" for c in completions])
        mask = completion_mask(torch.tensor(lengths), max(lengths), truncated if a.mask_truncated_completions
                               else None).to(trainer.device)
        ref = self._reference_logps(trainer, sequences, starts, lengths) if a.beta > 0 else None
        t3 = time.perf_counter()
        metrics = {**reward_metrics(per_func, rewards, self.names, g),
                   **_length_metrics(lengths, truncated)}
        samples = self._samples(prompts, completions, per_func, rewards, advantages)
        return Rollout(sequences, starts, lengths, mask, advantages.to(trainer.device), ref, metrics, samples,
                       times={"generation": t1 - t0, "reward": t2 - t1, "reference": t3 - t2})

    def _optimize(self, trainer: Trainer, r: Rollout) -> dict[str, float]:
        """Forward and backward over the rollout in micro-batches of micro_batch_size rows."""
        a, model, state = self.args, trainer.model, trainer.state
        config = a.loss_config()
        n_rows, mbs = len(r.starts), trainer.args.micro_batch_size
        window_tokens = r.mask.sum()
        keep_old = a.num_iterations > 1 and r.old_logps is None
        old_parts: list[Tensor] = []
        totals = {"loss": 0.0, "entropy": 0.0}
        weighted: dict[str, float] = {}
        tokens_total = max(float(window_tokens), 1.0)
        for lo in range(0, n_rows, mbs):
            hi = min(lo + mbs, n_rows)
            starts, lengths = r.starts[lo:hi], r.lengths[lo:hi]
            width = max(lengths)
            seq = r.sequences[lo:hi, :max(s + n for s, n in zip(starts, lengths))]
            mask = r.mask[lo:hi, :width]
            with trainer.autocast():
                logps, entropy = completion_logprobs(model, seq, starts, lengths, a.temperature, with_entropy=True)
            assert entropy is not None
            loss, m = grpo_loss(logps, r.advantages[lo:hi], mask, config,
                                old_logps=None if r.old_logps is None else r.old_logps[lo:hi, :width],
                                ref_logps=None if r.ref_logps is None else r.ref_logps[lo:hi, :width],
                                accumulation_steps=n_rows / (hi - lo), window_tokens=window_tokens)
            loss.backward()
            if keep_old:
                old_parts.append(_pad_cols(logps.detach(), r.mask.size(1)))
            share = float(mask.sum()) / tokens_total
            totals["loss"] += float(loss.detach())
            totals["entropy"] += float((entropy * mask).sum()) / tokens_total
            for k, v in m.items():
                weighted[k] = weighted.get(k, 0.0) + v * share
        if keep_old:
            r.old_logps = torch.cat(old_parts)
        state.tokens_seen += sum(r.starts) + sum(r.lengths)
        state.trained_tokens += int(float(window_tokens))
        return {**totals, **weighted}

    # ---- sampling and scoring ----

    def _seeds(self, trainer: Trainer, purpose: str, step: int, n: int) -> list[int]:
        """One seed per completion, a function of (seed, purpose, step, row) only."""
        rng = random.Random(f"unsloth-grpo:{trainer.args.seed}:{purpose}:{step}")
        return [rng.getrandbits(63) for _ in range(n)]

    def _sample(self, trainer: Trainer, prompts: list[list[int]], seeds: list[int]) -> list[_Completion]:
        a = self.args
        params = [SamplingParams(max_new_tokens=a.max_completion_length, temperature=a.temperature, top_p=a.top_p,
                                 top_k=a.top_k, min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=s)
                  for s in seeds]
        out = [_Completion() for _ in prompts]
        with rollout_mode(trainer.model):
            for deltas in self.generator(trainer).stream(prompts, params):
                for d in deltas:
                    c = out[d.index]
                    c.ids.extend(d.token_ids)
                    c.text += d.text
                    if d.finish_reason is not None:
                        c.finish_reason = d.finish_reason
                        if d.finish_reason == "stop" and d.stop_token_id is not None:
                            c.ids.append(d.stop_token_id)  # trained on, as TRL does: the model learns to stop
        return out

    def _score(self, rows: list[TokenizedPrompt], completions: list[_Completion]) -> Tensor:
        examples = [r.example for r in rows]
        keys = list(dict.fromkeys(k for e in examples for k in e.columns))
        columns = {k: [e.columns.get(k) for e in examples] for k in keys}
        texts: list[Any] = [[{"role": "assistant", "content": c.text}] if e.conversational else c.text
                            for e, c in zip(examples, completions)]
        return score(self.reward_funcs, [e.prompt for e in examples], texts, [list(c.ids) for c in completions],
                     columns)

    @torch.no_grad()
    def _reference_logps(self, trainer: Trainer, sequences: Tensor, starts: list[int], lengths: list[int]) -> Tensor:
        """The reference policy's log-probabilities: the base (adapters off), in eval mode, micro-batch by
        micro-batch. With modules_to_save (a trained head or embedding) those stay trained, as in DPO here."""
        model = self.reference or trainer.model
        was_training = model.training
        model.eval()
        parts = []
        try:
            with reference_policy(model) if self.reference is None else nullcontext(), trainer.autocast():
                for lo in range(0, len(starts), trainer.args.micro_batch_size):
                    hi = min(lo + trainer.args.micro_batch_size, len(starts))
                    lp, _ = completion_logprobs(model, sequences[lo:hi], starts[lo:hi], lengths[lo:hi],
                                                self.args.temperature)
                    parts.append(_pad_cols(lp, max(lengths)))
        finally:
            model.train(was_training)
        return torch.cat(parts)

    def _samples(self, prompts: list[TokenizedPrompt], completions: list[_Completion], per_func: Tensor,
                 rewards: Tensor, advantages: Tensor) -> list[dict[str, Any]]:
        """The first `log_rollouts` prompts with their groups: what a user reads to see what the policy learns."""
        g, out = self.args.num_generations, []
        # A reward function may explain its latest scores (a grader's sub-scores and errors): `explain(row)`.
        explainers = [(n, f.explain) for n, f in zip(self.names, self.reward_funcs) if hasattr(f, "explain")]
        for i, p in enumerate(prompts[: self.args.log_rollouts]):
            group = []
            for j in range(i * g, (i + 1) * g):
                c = completions[j]
                entry = {"text": c.text, "reward": _number(rewards[j]),
                         "rewards": {n: _number(per_func[j, k]) for k, n in enumerate(self.names)},
                         "advantage": float(advantages[j]), "finish_reason": c.finish_reason,
                         "num_tokens": len(c.ids)}
                if explainers:
                    entry["details"] = {n: explain(j) for n, explain in explainers}
                group.append(entry)
            out.append({"prompt": p.example.prompt, "completions": group})
        return out

    # ---- evaluation ----

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """One completion per held-out prompt, sampled as in training with seeds fixed for the run (every
        evaluation scores the same draws of the current policy): the mean reward and each function's."""
        items: list[TokenizedPrompt] = list(trainer.eval_data)[:self.args.eval_samples]
        chunk = max(1, trainer.batch_items * self.args.num_generations)
        per_func_parts, lengths = [], []
        for lo in range(0, len(items), chunk):
            rows = items[lo:lo + chunk]
            completions = self._sample(trainer, [r.ids for r in rows], self._seeds(trainer, "eval", lo, len(rows)))
            per_func_parts.append(self._score(rows, completions))
            lengths += [len(c.ids) for c in completions]
        per_func = torch.cat(per_func_parts)
        rewards = combine_rewards(per_func, self.weights)
        metrics = reward_metrics(per_func, rewards, self.names, 1, prefix="eval_")
        metrics["eval_completions/mean_length"] = sum(lengths) / max(len(lengths), 1)
        return metrics

    def eval_score(self, metrics: dict[str, float]) -> float:
        return -metrics["eval_reward"]

    # ---- resume ----

    def state_dict(self) -> MethodState | None:
        r = self.rollout
        if r is None or r.uses >= self.args.num_iterations:
            return None  # the next step samples anew
        tensors = {"sequences": r.sequences, "mask": r.mask, "advantages": r.advantages}
        for name, value in (("ref_logps", r.ref_logps), ("old_logps", r.old_logps)):
            if value is not None:
                tensors[name] = value
        data = {"starts": r.starts, "lengths": r.lengths, "metrics": r.metrics, "samples": r.samples,
                "uses": r.uses, "reported": r.reported}
        return tensors, data

    def load_state_dict(self, state: MethodState | None) -> None:
        if state is None:
            self.rollout = None
            return
        t, d = state
        self.rollout = Rollout(t["sequences"], d["starts"], d["lengths"], t["mask"], t["advantages"],
                               t.get("ref_logps"), d["metrics"], d["samples"], t.get("old_logps"), d["uses"],
                               d["reported"])


@dataclass
class _Completion:
    ids: list[int] = field(default_factory=list)  # the stop token included when the row stopped on one
    text: str = ""
    finish_reason: str = "length"


@contextmanager
def rollout_mode(model: Llama) -> Iterator[None]:
    """Sampling from a model mid-training: eval mode (no dropout), no checkpointing; afterwards the flags as they
    were and the KV cache freed (while training it is dead weight)."""
    training, checkpointing = model.training, model.gradient_checkpointing
    model.eval()
    model.gradient_checkpointing = False
    try:
        yield
    finally:
        model.clear_caches()
        model.train(training)
        model.gradient_checkpointing = checkpointing


def _right_pad(rows: list[list[int]], pad_id: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)


def _pad_cols(x: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, width - x.size(1)))


def _length_metrics(lengths: list[int], truncated: Tensor) -> dict[str, float]:
    ended = [n for n, t in zip(lengths, truncated.tolist()) if not t]
    return {"completions/mean_length": sum(lengths) / len(lengths), "completions/min_length": float(min(lengths)),
            "completions/max_length": float(max(lengths)), "completions/clipped_ratio": float(truncated.float().mean()),
            "completions/mean_terminated_length": sum(ended) / len(ended) if ended else 0.0}


def _number(x: Tensor) -> float | None:
    value = float(x)
    return None if value != value else value  # NaN (unscored) as None


def _unique(names: list[str]) -> list[str]:
    """Metric names per function, made distinct (two lambdas are both '<lambda>')."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}_{seen[n]}")
    return out
