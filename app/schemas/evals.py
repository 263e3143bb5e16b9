"""Evals shapes (OpenAI's Evals API, the part its fine-tuning users relied on): an eval's create and update bodies
and object, a run's create body (a `completions` data source: a JSONL file or inline rows, an input messages
template, a model this server serves and its sampling parameters) and object, and a run's output items.

Testing criteria travel as plain objects: `app.services.eval_criteria` parses each with the engine's
`validate_grader`, so one definition of OpenAI's grader shapes serves fine-tuning, graders/run and evals, and a
refusal names the field from the body's root (`testing_criteria[0].operation`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.schemas.common import Identifier, Text
from app.schemas.jobs import MetadataKey, MetadataValue

Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]
Name = Annotated[Text, StringConstraints(max_length=256)]
RunStatusName = Literal["queued", "in_progress", "completed", "failed", "canceled"]
MAX_CRITERIA = 32
MAX_TEMPLATE_MESSAGES = 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- evals ----


class CustomDataSourceConfig(_Body):
    """The items' JSON schema. `include_sample_schema`: the runs generate samples (a `completions` run does)."""

    type: Literal["custom"]
    item_schema: dict[str, Any]
    include_sample_schema: bool = False


class EvalCreate(_Body):
    name: Name | None = None
    metadata: Metadata | None = None
    data_source_config: CustomDataSourceConfig
    # OpenAI's graders (string_check, text_similarity, score_model, label_model, python, multi); python and multi
    # also take OpenAI's evals `pass_threshold`
    testing_criteria: Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_CRITERIA)]


class EvalUpdate(_Body):
    name: Name | None = None
    metadata: Metadata | None = None


class EvalObject(BaseModel):
    id: str
    object: Literal["eval"] = "eval"
    name: str
    created_at: int
    metadata: dict[str, str] | None = None
    # {"type": "custom", "schema": {"type": "object", "properties": {"item": ..., "sample": ...}, ...}}
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]  # as given, each with its "id" (the name its results carry)


class EvalList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class EvalDeleted(BaseModel):
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool
    eval_id: str


# ---- a run's data source ----


class TextPart(_Body):
    type: Literal["input_text", "output_text"]
    text: str


class TemplateMessage(_Body):
    """A chat message whose text may hold `{{item.<field>}}` references (OpenAI's EasyInputMessage / EvalItem, text
    only)."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | TextPart | Annotated[list[TextPart], Field(min_length=1)]
    type: Literal["message"] | None = None


class InputMessagesTemplate(_Body):
    type: Literal["template"]
    template: Annotated[list[TemplateMessage], Field(min_length=1, max_length=MAX_TEMPLATE_MESSAGES)]


class InputMessagesItemReference(_Body):
    """The messages are in each item: `item.<field>` names a list of {role, content}."""

    type: Literal["item_reference"]
    item_reference: Annotated[str, StringConstraints(min_length=1, max_length=512)]


class FileContentRow(_Body):
    item: dict[str, Any]
    sample: dict[str, Any] | None = None  # accepted as OpenAI's; a completions run generates its own


class FileContentSource(_Body):
    type: Literal["file_content"]
    content: Annotated[list[FileContentRow], Field(min_length=1)]


class FileIdSource(_Body):
    """A JSONL file uploaded with purpose `evals` (or `fine-tune`): each line `{"item": {...}}`, or the item
    itself."""

    type: Literal["file_id"]
    id: Annotated[Identifier, StringConstraints(min_length=1, max_length=64)]


class SamplingParams(_Body):
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # default 1
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None  # default 1
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # default: the server's max_tokens
    seed: Annotated[int, Field(ge=0, lt=2**62)] | None = None  # default: drawn once per run; item k uses seed + k
    reasoning_effort: str | None = None  # accepted and ignored: the open models served here have no such setting


class CompletionsDataSource(_Body):
    type: Literal["completions"]
    source: Annotated[FileContentSource | FileIdSource, Field(discriminator="type")]
    input_messages: Annotated[InputMessagesTemplate | InputMessagesItemReference, Field(discriminator="type")]
    model: Annotated[Identifier, StringConstraints(min_length=1, max_length=512)]
    sampling_params: SamplingParams | None = None


class RunCreate(_Body):
    name: Name | None = None
    metadata: Metadata | None = None
    data_source: CompletionsDataSource


# ---- runs and output items ----


class ResultCounts(BaseModel):
    total: int = 0
    errored: int = 0  # no answer could be sampled (a template field missing, a prompt past the context)
    failed: int = 0  # answered, and some criterion did not pass
    passed: int = 0  # answered, and every criterion passed


class CriterionResult(BaseModel):
    testing_criteria: str  # the criterion's id
    passed: int
    failed: int


class ModelUsage(BaseModel):
    model_name: str
    invocation_count: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0


class EvalError(BaseModel):
    code: str
    message: str
    param: str | None = None


class EvalRunObject(BaseModel):
    id: str
    object: Literal["eval.run"] = "eval.run"
    eval_id: str
    name: str
    model: str
    status: RunStatusName
    created_at: int
    data_source: dict[str, Any]  # as given
    metadata: dict[str, str] | None = None
    result_counts: ResultCounts
    per_testing_criteria_results: list[CriterionResult]
    per_model_usage: list[ModelUsage]
    report_url: str | None = None  # no dashboard here
    error: EvalError | None = None
    cancel_requested: bool = False  # extension: a cancel asked of an in-progress run, honoured between batches
    started_at: int | None = None
    finished_at: int | None = None


class EvalRunList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EvalRunObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class EvalRunDeleted(BaseModel):
    object: Literal["eval.run.deleted"] = "eval.run.deleted"
    deleted: bool
    run_id: str


class OutputItemObject(BaseModel):
    id: str
    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    run_id: str
    eval_id: str
    created_at: int
    status: Literal["pass", "fail"]
    datasource_item_id: int
    datasource_item: dict[str, Any]
    # per criterion: {"name" (its id), "type", "score", "passed", "sample" (a model grader's exchange), "errors"}
    results: list[dict[str, Any]]
    # input, output [{role, content}], finish_reason, model, usage, temperature, top_p, max_completion_tokens, seed,
    # error ({code, message} when no answer could be sampled)
    sample: dict[str, Any]


class OutputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OutputItemObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None
