"""`/v1/completions` and `/v1/chat/completions` request and response shapes (OpenAI's; vLLM's sampling extras
`top_k`, `min_p`, `repetition_penalty` accepted as extra body keys). Unknown keys are ignored, as vLLM does; keys we
know but cannot honour are refused by name in the service."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from app.schemas.common import Identifier


def _integral(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer: take an integral float as its int (2.5 and "2" still fail)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _seed(value: int) -> int:
    if not -(2**63) <= value < 2**64:  # what torch's generators take
        raise ValueError("a seed must fit in 64 bits: between -2**63 and 2**64 - 1")
    return value


Int = Annotated[int, BeforeValidator(_integral)]
Seed = Annotated[Int, AfterValidator(_seed)]
INT32 = 2**31 - 1  # the largest count or id a field takes (bigger is never meaningful, and costs the engine)
StopText = Annotated[str, Field(min_length=1, max_length=1000)]
Stop = StopText | Annotated[list[StopText], Field(max_length=4)] | None
TokenIds = list[Annotated[Int, Field(ge=0, le=INT32)]]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = None


class SamplingFields(BaseModel):
    # Unknown keys are ignored (as vLLM does); known ones are not coerced (`"max_tokens": "5"` is a 400), except an
    # integral float where an integer is expected. Every bound is one the engine accepts, so a bad value is a 400
    # naming its field, never an error inside a batch other requests share.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: Annotated[Identifier, Field(min_length=1, max_length=512)]
    max_tokens: Annotated[Int, Field(ge=1, le=INT32)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[Int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Seed | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    # token id (as a string, JSON keys being strings) -> bias; the ids are checked against the model's vocabulary
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=1024)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # extensions (vLLM names)
    top_k: Annotated[Int, Field(ge=-1, le=INT32)] | None = None  # at most the vocabulary, checked by the service
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    ignore_eos: bool = False  # keep generating past end-of-sequence tokens (benchmarks, load tests)


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] | \
        Annotated[list[TokenIds], Field(min_length=1)]
    # 0 with echo (and logprobs): score the prompt only, as log-likelihood evaluations ask
    max_tokens: Annotated[Int, Field(ge=0, le=INT32)] | None = None
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    best_of: Annotated[Int, Field(ge=1, le=128)] | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    """A call's function: its name and its arguments as JSON text (in a request's assistant message and in the
    response alike)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # other keys (tool_call_id, ...) reach the chat template untouched
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's calls, rendered on the next turn


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: free text, any JSON object, or instances of a JSON schema (held to it by
    constrained decoding whether `strict` is set or not)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]  # OpenAI's rule
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None  # a forced call's arguments are held to the schema whether set or not


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: the reply is one call of that function."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[Int, Field(ge=1, le=INT32)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None  # none given: auto with tools, none without (OpenAI's default)
    parallel_tool_calls: bool | None = None  # none given: true
    functions: list[dict[str, Any]] | None = None
    response_format: ResponseFormat | None = None


# ---- responses (non-streaming; stream chunks are built as dicts) ----


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token: nothing comes before it
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


ChatFinish = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: ChatFinish
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


# ---- streamed chunks (`stream: true`): what OpenAI sends, field for field ----
# Built with every field they carry set explicitly and written with `exclude_unset`, so a field OpenAI leaves out of
# a chunk (a later delta's role, usage without `include_usage`) is left out here too, and one it sends as null is null.


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed call: the first piece carries `id`, `type` and the function's name, later ones its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: ChatFinish | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
