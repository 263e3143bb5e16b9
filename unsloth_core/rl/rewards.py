"""Reward functions with TRL's signature, called on a rollout, and the statistics logged about their scores.

A reward function takes `prompts` and `completions` (one entry per completion: a prompt repeats for each of its
completions) and, as keyword lists of the same length, `completion_ids` and every other field of the dataset rows;
it returns one float per completion, or None where it does not apply (that function then leaves the row out). An
`async def` function is awaited; several run concurrently.

    def exact(prompts, completions, answer, **kwargs):
        return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from unsloth_core.rl.grpo_loss import nanstd

RewardFunc = Callable[..., Sequence[float | None] | Awaitable[Sequence[float | None]]]


def reward_name(func: RewardFunc) -> str:
    """The name metrics use for a function (its __name__, as TRL), or its class's for a callable object."""
    return getattr(func, "__name__", None) or type(func).__name__


def score(funcs: Sequence[RewardFunc], prompts: list[Any], completions: list[Any], completion_ids: list[list[int]],
          columns: dict[str, list[Any]]) -> Tensor:
    """(completions, funcs) float32 rewards, NaN where a function returned None. Raises ValueError for a function
    that returns the wrong number of values or a value that is not a number."""
    kwargs = {**columns, "completion_ids": completion_ids}
    results: dict[int, Any] = {}
    waiting: list[tuple[int, Awaitable[Any]]] = []
    for i, func in enumerate(funcs):
        out = func(prompts=prompts, completions=completions, **kwargs)
        if inspect.isawaitable(out):
            waiting.append((i, out))
        else:
            results[i] = out
    if waiting:
        async def gather() -> list[Any]:
            return list(await asyncio.gather(*(w for _, w in waiting)))

        for (i, _), out in zip(waiting, asyncio.run(gather())):
            results[i] = out
    columns_out = [_as_floats(results[i], reward_name(f), len(completions)) for i, f in enumerate(funcs)]
    return torch.tensor(columns_out, dtype=torch.float32).T.reshape(len(completions), len(funcs))


def _as_floats(values: Any, name: str, n: int) -> list[float]:
    if values is None or isinstance(values, str | bytes) or not hasattr(values, "__len__"):
        raise ValueError(f"reward function {name!r} returned {type(values).__name__}; it must return a list with "
                         f"one float (or None) per completion")
    values = list(values.tolist() if isinstance(values, Tensor) else values)
    if len(values) != n:
        raise ValueError(f"reward function {name!r} returned {len(values)} rewards for {n} completions (one per "
                         "completion, None where it does not apply)")
    out = []
    for v in values:
        if v is None:
            out.append(math.nan)
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"reward function {name!r} returned {v!r}; rewards are numbers or None")
        else:
            out.append(float(v))
    return out


def reward_metrics(per_func: Tensor, rewards: Tensor, names: Sequence[str], num_generations: int,
                   prefix: str = "") -> dict[str, float]:
    """TRL's names: `reward` and `reward_std` of the combined reward, `rewards/<name>/mean` and `/std` of each
    function over the rows it scored, and `frac_reward_zero_std`, the share of groups whose rewards are all equal
    (their advantages are 0: nothing to learn from them)."""
    metrics = {f"{prefix}reward": float(rewards.nanmean()), f"{prefix}reward_std": float(nanstd(rewards))}
    for i, name in enumerate(names):
        metrics[f"{prefix}rewards/{name}/mean"] = float(per_func[:, i].nanmean())
        metrics[f"{prefix}rewards/{name}/std"] = float(nanstd(per_func[:, i]))
    if num_generations > 1:
        group_std = nanstd(rewards.view(-1, num_generations), dim=1)
        metrics[f"{prefix}frac_reward_zero_std"] = float(torch.isclose(group_std, torch.zeros_like(group_std))
                                                         .float().mean())
    return metrics
