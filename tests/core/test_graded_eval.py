"""Graders at an SFT run's evaluations: greedy answers to the first validation prompts, scored per grader, logged
under GRPO's evaluation names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.helpers import tiny_model_dir
from unsloth_core.data.synthetic import fact_rows, write_jsonl
from unsloth_core.finetune import finetune
from unsloth_core.lora import LoRAConfig
from unsloth_core.rl.grader_reward import GraderReward
from unsloth_core.trainer import TrainArgs, TrainerCallbacks

ALWAYS = {"type": "string_check", "name": "always", "input": "{{item.tag}}", "reference": "x", "operation": "eq"}
NEVER = {"type": "string_check", "name": "never", "input": "{{sample.output_text}}",
         "reference": "no tiny model writes this", "operation": "like"}
ECHO = {"type": "string_check", "name": "echo", "input": "{{item.messages[0].content}}",
        "reference": "{{item.messages[0].content}}", "operation": "eq"}


class Logs(TrainerCallbacks):
    def __init__(self) -> None:
        self.evals: list[dict[str, Any]] = []

    def on_log(self, metrics: dict[str, Any]) -> None:
        if "eval_loss" in metrics:
            self.evals.append(metrics)


def test_graders_score_greedy_answers_at_each_evaluation(tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path / "model", std=0.05)
    train = write_jsonl(tmp_path / "train.jsonl", fact_rows(4, seed=1))
    valid = write_jsonl(tmp_path / "valid.jsonl", [{**r, "tag": "x"} for r in fact_rows(5, seed=2)])
    args = TrainArgs(output_dir=str(tmp_path / "out"), micro_batch_size=2, max_steps=2, eval_steps=1,
                     learning_rate=5e-3, max_seq_length=128, seed=7, n_probes=0)
    logs = Logs()
    rewards = [GraderReward(g) for g in (ALWAYS, NEVER, ECHO)]
    finetune(model, train, args, LoRAConfig(r=4), valid, logs, eval_rewards=rewards, eval_samples=3)
    assert [e["step"] for e in logs.evals] == [1, 2]
    for e in logs.evals:
        # the row's own fields (the prompt's messages included) reach the grader as its item
        assert (e["eval_rewards/always/mean"], e["eval_rewards/never/mean"], e["eval_rewards/echo/mean"]) == (
            1.0, 0.0, 1.0)
        assert abs(e["eval_reward"] - 2 / 3) < 1e-6
    assert rewards[0].error_counts == {}
