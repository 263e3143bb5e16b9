"""`POST /v1/tool_call_checks` (an extension): does a model call tools on these conversations, as it is served?"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import Identifier

MAX_CONVERSATIONS = 256


class ToolCallCheckRequest(BaseModel):
    """The conversations come from a file you uploaded (`file_id`, training-file chat rows with `tools`) or inline
    (`conversations`, the same rows); each assistant turn that calls tools is one turn of the check."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[Identifier, Field(min_length=1, max_length=512)]
    file_id: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    conversations: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_CONVERSATIONS)] | None = None
    max_turns: Annotated[int, Field(ge=1, le=64)] = 16
    max_tokens: Annotated[int, Field(ge=1, le=1024)] = 128


class CheckedCall(BaseModel):
    name: str
    arguments: str


class CheckedTurn(BaseModel):
    conversation: int  # the row's index in the file or in `conversations`
    expected: list[str]  # the functions the row's assistant called
    output: str | None = None  # the reply's text outside its calls; None when the turn was skipped
    tool_calls: list[CheckedCall] = []
    valid: bool = False
    matched: bool = False
    problems: list[str] = []
    skipped: str | None = None  # why the turn was not asked (its prompt does not fit the model's context)


class ToolCallCheck(BaseModel):
    object: Literal["tool_call_check"] = "tool_call_check"
    model: str
    n_turns: int  # turns asked
    n_skipped: int
    valid_rate: float | None  # share of asked turns whose reply has calls, each of an offered function with arguments
    match_rate: float | None  # valid against that function's schema; match: and calling what the data called
    turns: list[CheckedTurn]
