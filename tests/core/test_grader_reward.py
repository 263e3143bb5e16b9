"""A grader as GRPO's reward: TRL's reward signature, the row as the grader's `item` (its prompt included),
conversational completions read as their text, failures scored 0 and explained for the rollouts."""

from __future__ import annotations

from typing import Any

import pytest

from unsloth_core.graders import GraderUnavailableError
from unsloth_core.rl.grader_reward import GraderReward

EXACT = {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "{{item.answer}}",
         "operation": "eq"}


def test_scores_follow_the_grader_with_the_row_as_item() -> None:
    reward = GraderReward(EXACT)
    assert reward.__name__ == "exact"
    scores = reward(["2+2=", "3+3="], ["4", "7"], answer=["4", "6"], completion_ids=[[1], [2]])
    assert scores == [1.0, 0.0]
    assert reward.explain(0) == {"passed": True} and reward.explain(1) == {"passed": False}


def test_the_prompt_is_part_of_the_item_and_chat_completions_are_read_as_text() -> None:
    echo = {"type": "string_check", "name": "echo", "input": "{{sample.output_text}}",
            "reference": "{{item.messages[0].content}}", "operation": "like"}
    prompt: list[dict[str, Any]] = [{"role": "user", "content": "blue"}]
    completions = [[{"role": "assistant", "content": "the sky is blue"}], [{"role": "assistant", "content": "no"}]]
    assert GraderReward(echo)([prompt, prompt], completions) == [1.0, 0.0]


def test_a_multi_graders_sub_scores_and_a_missing_field_are_explained() -> None:
    multi = {"type": "multi", "name": "both", "calculate_output": "0.5 * exact + 0.5 * short", "graders": {
        "exact": EXACT,
        "short": {"type": "text_similarity", "name": "short", "input": "{{sample.output_text}}",
                  "reference": "{{item.answer}}", "evaluation_metric": "fuzzy_match"}}}
    reward = GraderReward(multi)
    assert reward(["q"], ["4"], answer=["4"]) == [pytest.approx(1.0)]
    assert reward.explain(0)["sub_scores"] == {"exact": 1.0, "short": pytest.approx(1.0)}
    assert reward(["q"], ["4"]) == [0.0]  # the row has no `answer`: 0, and the error says so
    errors = reward.explain(0)["errors"]
    assert errors and {e["code"] for e in errors} == {"invalid_variable_error"}
    assert reward.error_counts["invalid_variable_error"] >= 1


def test_a_python_grader_needs_the_operators_permission() -> None:
    python = {"type": "python", "name": "p", "source": "def grade(sample, item):\n    return 1.0\n"}
    with pytest.raises(GraderUnavailableError, match="UNSLOTH_ALLOW_PYTHON_GRADERS"):
        GraderReward(python)(["q"], ["a"])
