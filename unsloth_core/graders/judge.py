"""The judge behind score_model and label_model graders: any chat model, injected by the caller.

The engine does not know which models a server serves; the API and the worker pass a `Judge` that runs
`JudgeRequest.model` (a base model, a fine-tune, a checkpoint) on the messages. It takes a batch (every sample
of a GRPO step at once, so a served judge can batch them) and returns one text per request, in order. An exception
fails that batch's samples with `model_grader_server_error`, which scores them 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class JudgeRequest:
    """One judge call.

    Args:
        model: the grader's `model`, as the user wrote it.
        messages: chat messages [{"role", "content"}], templates filled in; OpenAI's `developer` role is passed as
            `system` (chat templates of open models know no `developer`).
        sampling_params: the grader's sampling_params that were set (temperature, top_p, seed,
            max_completions_tokens, reasoning_effort).
        response_format: the JSON schema OpenAI constrains its judge with ({"result": ..., "steps": [...]}), in
            chat completions' `response_format` shape. A judge that can constrain decoding may use it; the grader
            also reads a plain answer (see `model_grader`).
    """

    model: str
    messages: tuple[dict[str, str], ...]
    sampling_params: dict[str, Any]
    response_format: dict[str, Any]


class Judge(Protocol):
    def __call__(self, requests: Sequence[JudgeRequest], /) -> Sequence[str]: ...
