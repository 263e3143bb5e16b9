"""The judge of score_model and label_model graders on this server: the model a grader names (a base model, a
fine-tune, a checkpoint the key may use) answers through the chat completions path, as a client's chat completion
would: the model's chat template, the grader's sampling parameters, a generation slot out of the key's share, and
decoding held to OpenAI's judge schema (`{"steps": [...], "result": ...}`) by `response_format`.

Grading runs on a worker thread (a python grader beside a model grader in a multi grader can take seconds); the
judge's generations run on the event loop, as every generation does, and the thread waits for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import anyio.from_thread
from starlette.requests import Request

from app.inference.engine import InferenceEngine
from app.schemas.completions import ChatCompletion, ChatCompletionRequest
from app.schemas.graders import TokenUsage
from app.services import completions
from app.services.models import Servable
from unsloth_core.graders import JudgeRequest


def chat_request(judge_request: JudgeRequest) -> ChatCompletionRequest:
    """The chat completion a judge call makes: OpenAI's sampling names mapped to chat completions' ones."""
    params = judge_request.sampling_params
    body: dict[str, Any] = {
        "model": judge_request.model,
        "messages": list(judge_request.messages),
        "temperature": params.get("temperature"),
        "top_p": params.get("top_p"),
        "seed": params.get("seed"),
        "max_completion_tokens": params.get("max_completions_tokens"),
        "response_format": judge_request.response_format,
    }
    return ChatCompletionRequest.model_validate(body)


class ServedJudge:
    """A `unsloth_core.graders.Judge` over this server's models.

    Args:
        servables: the grader's judge models by the name it uses, resolved (and checked for the key) beforehand.
        request: the HTTP request being answered: its client going away stops the judge's generations.
    """

    def __init__(self, *, engine: InferenceEngine, servables: Mapping[str, Servable], request: Request,
                 key_id: str) -> None:
        self.engine, self.servables, self.request, self.key_id = engine, dict(servables), request, key_id
        self.usage: dict[str, TokenUsage] = {}  # tokens spent per judge model (OpenAI's per-model usage)

    def __call__(self, requests: Sequence[JudgeRequest], /) -> list[str]:
        """Called on the grading thread (one started by anyio, as `run_in_threadpool` does)."""
        return anyio.from_thread.run(self._answer_all, list(requests))

    async def _answer_all(self, requests: list[JudgeRequest]) -> list[str]:
        answers = await asyncio.gather(*(self._answer(r) for r in requests), return_exceptions=True)
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer  # the grader scores the batch 0 with model_grader_server_error and this message
        return [str(answer) for answer in answers]

    async def _answer(self, judge_request: JudgeRequest) -> str:
        completion = await completions.complete(engine=self.engine, request=self.request,
                                                servable=self.servables[judge_request.model],
                                                body=chat_request(judge_request), key_id=self.key_id)
        assert isinstance(completion, ChatCompletion)  # not streamed
        used = completion.usage
        total = self.usage.setdefault(judge_request.model, TokenUsage(prompt_tokens=0, completion_tokens=0,
                                                                      total_tokens=0))
        total.prompt_tokens += used.prompt_tokens
        total.completion_tokens += used.completion_tokens
        total.total_tokens += used.total_tokens
        return completion.choices[0].message.content or ""
