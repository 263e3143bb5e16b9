"""Graders at evaluation time for methods that do not sample while training (SFT, DPO): the first held-out rows'
prompts answered greedily by the model as it is, each answer scored by every grader against its row.

Metrics are GRPO's evaluation names (`eval_reward`: the graders' mean; `eval_rewards/<grader>/mean`), so a job
reads the same whatever its method. A grader is any reward function with TRL's signature (rl/grader_reward.py's
GraderReward for OpenAI's graders); the row's fields reach it as keyword lists, as they reach GRPO's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unsloth_core.data.formats import RowError, parse_row
from unsloth_core.model import Llama
from unsloth_core.probes import Prompt, example_prompt, make_probes
from unsloth_core.rl.rewards import RewardFunc, reward_name, score
from unsloth_core.tokenizer import Tokenizer


@dataclass
class GradedEval:
    rewards: list[RewardFunc]
    prompts: list[Prompt]
    rows: list[dict[str, Any]]
    tokenizer: Tokenizer
    max_new_tokens: int = 256
    max_prompt_tokens: int | None = None

    def run(self, model: Llama) -> dict[str, float]:
        probes = make_probes(self.prompts, self.tokenizer, self.max_new_tokens, self.max_prompt_tokens)
        if probes is None:
            return {}
        answers = probes.run(model)
        # reward functions get conversations as message lists (TRL's shape), a tools prompt's messages included
        prompts: list[Any] = [p["messages"] if isinstance(p, dict) else p for p in self.prompts]
        texts: list[Any] = [[{"role": "assistant", "content": a["output"]}] if isinstance(p, list) else a["output"]
                            for p, a in zip(prompts, answers)]
        keys = list(dict.fromkeys(k for row in self.rows for k in row))
        columns = {k: [row.get(k) for row in self.rows] for k in keys if k not in ("prompt", "messages")}
        ids = [self.tokenizer.encode(a["output"], add_special_tokens=False) for a in answers]
        per_func = score(self.rewards, prompts, texts, ids, columns)  # (rows, funcs), NaN: not scored
        means = torch.nanmean(per_func, dim=0)
        metrics = {f"eval_rewards/{reward_name(f)}/mean": float(m) for f, m in zip(self.rewards, means)}
        metrics["eval_reward"] = float(torch.nanmean(means))
        return metrics


def graded_eval(source: str | Path, rewards: Sequence[RewardFunc], tokenizer: Tokenizer, n: int,
                max_new_tokens: int = 256, max_prompt_tokens: int | None = None) -> GradedEval | None:
    """Graders over the first `n` rows of a data file that have a prompt (a conversation up to its reply, a
    completion's prompt, a preference pair's); None when there are no graders or no such rows."""
    if not rewards:
        return None
    prompts: list[Prompt] = []
    rows: list[dict[str, Any]] = []
    with Path(source).open("rb") as f:
        for raw in f:
            if len(prompts) == n:
                break
            try:
                row = json.loads(raw)
                prompt = example_prompt(parse_row(row)[1])
            except (ValueError, RowError):
                continue  # the file was validated for training already; what is not a prompt is skipped here
            if prompt is not None:
                prompts.append(prompt)
                rows.append(row)
    if not prompts:
        return None
    return GradedEval(list(rewards), prompts, rows, tokenizer, max_new_tokens, max_prompt_tokens)
