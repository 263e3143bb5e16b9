"""Rollout shapes: what a reinforcement job sampled at a logged step, one prompt and its group of completions per
object, and their list."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class RolloutObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.rollout"] = "fine_tuning.job.rollout"
    created_at: int
    step: int
    prompt: Any  # as trained: a string, or a list of chat messages
    # Each: {"text", "reward", "rewards": {grader name: score}, "advantage", "finish_reason", "num_tokens"}, and
    # whatever else the engine reported (a grader's sub-scores and errors)
    completions: list[dict[str, Any]]


class RolloutList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RolloutObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
