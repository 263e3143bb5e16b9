"""OpenAI's `/v1/fine_tuning/alpha/graders/{validate,run}` bodies and answers.

The grader itself travels as a plain object: `unsloth_core.graders.validate_grader` parses it, so one definition of
OpenAI's grader shapes serves the API, the worker's GRPO rewards and the evaluations, and its errors name the field
inside the grader (`grader.graders.accuracy.operation`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class GraderValidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]


class GraderValidateResponse(BaseModel):
    grader: dict[str, Any]


class GraderRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grader: dict[str, Any]
    model_sample: str  # the `sample` namespace: output_text, and output_json when it parses as JSON
    item: dict[str, Any] | None = None  # the `item` namespace: the dataset row


class TokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class GraderRunMetadata(BaseModel):
    name: str
    type: str
    # OpenAI's flags (formula_parse_error, invalid_variable_error, model_grader_parse_error, ...), each a bool, and
    # the text fields beside some of them (python_grader_runtime_error_details, ...): see unsloth_core.graders.result
    errors: dict[str, bool | str | None]
    execution_time: float
    scores: dict[str, float]
    token_usage: int | None = None
    sampled_model_name: str | None = None


class GraderRunResponse(BaseModel):
    reward: float
    metadata: GraderRunMetadata
    sub_rewards: dict[str, float]
    model_grader_token_usage_per_model: dict[str, TokenUsage]
