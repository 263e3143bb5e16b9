"""The tool-call check for any model (`POST /v1/tool_call_checks`): each tool-calling assistant turn of the given
conversations is asked of the model as a chat completion with the row's tools (the same path, rendering and parser
as any client's request; greedy), and the reply's calls are judged against the offered functions' schemas by the
engine's check (unsloth_core/tool_call_check.py), the one every fine-tuning checkpoint gets."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import APIError, bad_request
from app.db.models import ApiKey
from app.inference.engine import InferenceEngine
from app.schemas.completions import ChatCompletion, ChatCompletionRequest
from app.schemas.tool_call_checks import CheckedCall, CheckedTurn, ToolCallCheck, ToolCallCheckRequest
from app.services import completions, files
from app.services.models import Servable
from unsloth_core.tool_call_check import ToolTurn, judge_calls, read_rows, tool_turns
from unsloth_core.tool_calls import ToolCall

# Turns asked at once: each holds one of the key's generation slots, and the engine batches them together.
CONCURRENCY = 4

Turn = tuple[int, ToolTurn]  # (the conversation's index, the turn)


def turns_of(*, session: Session, settings: Settings, key: ApiKey, body: ToolCallCheckRequest) -> list[Turn]:
    """The turns to ask: a 400 naming the field when there are none (or both sources or neither are given)."""
    if (body.file_id is None) == (body.conversations is None):
        raise bad_request("Give either file_id or conversations.", param="file_id")
    if body.file_id is not None:
        row = files.get_file(session=session, key=key, file_id=body.file_id, param="file_id")
        rows: Iterator[dict[str, Any]] = read_rows(files.readable_content(settings, row, param="file_id"))
        param = "file_id"
    else:
        rows, param = iter(body.conversations or []), "conversations"
    turns: list[Turn] = []
    for index, conversation in enumerate(rows):
        turns += [(index, t) for t in tool_turns([conversation], body.max_turns - len(turns))]
        if len(turns) == body.max_turns:
            break
    if not turns:
        raise bad_request("No tool-use turn found: the check needs chat rows with `tools` whose assistant calls "
                          "tools (`tool_calls`).", param=param, code="no_tool_turns")
    return turns


async def check(*, engine: InferenceEngine, request: Request, servable: Servable, body: ToolCallCheckRequest,
                turns: list[Turn], key_id: str) -> ToolCallCheck:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def ask(index: int, turn: ToolTurn, chat: ChatCompletionRequest) -> CheckedTurn:
        async with limit:
            try:
                reply = await completions.complete(engine=engine, request=request, servable=servable, body=chat,
                                                   key_id=key_id)
            except APIError as e:
                if e.code != "context_length_exceeded":
                    raise
                return CheckedTurn(conversation=index, expected=turn.expected, skipped=e.message)
        assert isinstance(reply, ChatCompletion)
        message = reply.choices[0].message
        calls = [ToolCall(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        result = judge_calls(message.content or "", calls, turn)
        return CheckedTurn(conversation=index, expected=turn.expected, output=result.output,
                           tool_calls=[CheckedCall(name=c.name, arguments=c.arguments) for c in calls],
                           valid=result.valid, matched=result.matched, problems=result.problems)

    requests = [_chat_request(body, index, turn) for index, turn in turns]  # every row checked before generating
    try:
        async with asyncio.TaskGroup() as group:  # a request's error ends the check, and the other turns with it
            tasks = [group.create_task(ask(index, turn, chat)) for (index, turn), chat in zip(turns, requests)]
    except BaseExceptionGroup as e:
        raise e.exceptions[0] from None  # the first turn's error (an APIError naming its field) is the answer
    checked = [t.result() for t in tasks]
    asked = [t for t in checked if t.skipped is None]
    return ToolCallCheck(model=body.model, n_turns=len(asked), n_skipped=len(checked) - len(asked),
                         valid_rate=sum(t.valid for t in asked) / len(asked) if asked else None,
                         match_rate=sum(t.matched for t in asked) / len(asked) if asked else None, turns=checked)


def _chat_request(body: ToolCallCheckRequest, index: int, turn: ToolTurn) -> ChatCompletionRequest:
    where = f"{'file_id' if body.file_id else 'conversations'}[{index}]"
    try:
        return ChatCompletionRequest.model_validate({
            "model": body.model, "messages": turn.messages, "tools": turn.tools, "temperature": 0.0,
            "max_completion_tokens": body.max_tokens})
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"Conversation {index} is not a chat request: {field}: {first['msg']}",
                          param=where) from None
