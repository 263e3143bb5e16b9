"""Fine-tuning job shapes: OpenAI's create body (with `method`, or the legacy `hyperparameters`), our extensions as
extra hyperparameters under `method.<type>.hyperparameters`, and the job, event, checkpoint and dry-run objects."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from app.schemas.common import Identifier, Text

Auto = Literal["auto"]
TargetModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALL_LINEAR_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUFFIX_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MetadataKey = Annotated[Text, StringConstraints(min_length=1, max_length=64)]
MetadataValue = Annotated[Text, StringConstraints(max_length=512)]


class ProbeMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: Annotated[Text, StringConstraints(max_length=8192)]


ProbePrompt = Annotated[Text, StringConstraints(min_length=1, max_length=8192)] | Annotated[
    list[ProbeMessage], Field(min_length=1, max_length=32)]


class _Strict(BaseModel):
    # No unknown keys, and no coercion: `"n_epochs": "3"` or `"warmup_ratio": false` is a 400, as the schema says.
    model_config = ConfigDict(extra="forbid", strict=True)


class LegacyHyperparameters(_Strict):
    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=100)] = "auto"


class _AdapterHyperparameters(LegacyHyperparameters):
    """OpenAI's three, plus the trainer's knobs every method shares (Together's names where they exist)."""

    learning_rate: Auto | Annotated[float, Field(gt=0, lt=1)] = "auto"  # absolute; wins over the multiplier
    lora_r: Auto | Annotated[int, Field(ge=1, le=1024)] = "auto"
    lora_alpha: Auto | Annotated[float, Field(gt=0, le=4096)] = "auto"
    lora_dropout: Auto | Annotated[float, Field(ge=0, lt=1)] = "auto"
    lora_target_modules: Auto | Literal["all-linear"] | Annotated[list[TargetModule], Field(min_length=1)] = "auto"
    lr_scheduler: Auto | Literal["linear", "cosine", "constant"] = "auto"
    warmup_ratio: Auto | Annotated[float, Field(ge=0, lt=1)] = "auto"
    max_seq_length: Auto | Annotated[int, Field(ge=16, le=1_048_576)] = "auto"
    n_checkpoints: Auto | Annotated[int, Field(ge=1, le=100)] = "auto"
    load_in_4bit: Auto | StrictBool = "auto"  # QLoRA: the frozen base in 4-bit NF4 (auto: off)
    # answered greedily at each checkpoint: "validation" (auto) the first 3 validation prompts; [] none
    probe_prompts: Auto | Literal["validation"] | Annotated[list[ProbePrompt], Field(max_length=8)] = "auto"


class SupervisedHyperparameters(_AdapterHyperparameters):
    packing: Auto | StrictBool = "auto"
    # OpenAI graders scoring greedy answers to the first `eval_samples` validation prompts at every checkpoint
    eval_graders: Annotated[list[dict[str, Any]], Field(max_length=8)] | None = None
    eval_samples: Auto | Annotated[int, Field(ge=1, le=10_000)] = "auto"


class DPOHyperparameters(SupervisedHyperparameters):
    beta: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"


class ReinforcementHyperparameters(_AdapterHyperparameters):
    """OpenAI's reinforcement hyperparameters, and GRPO's (TRL's names) in the same object. `batch_size` counts
    prompts per optimizer step; each is sampled `num_generations` times."""

    eval_interval: Auto | Annotated[int, Field(ge=1, le=1_000_000)] = "auto"  # steps between evaluations
    eval_samples: Auto | Annotated[int, Field(ge=1, le=10_000)] = "auto"  # validation prompts per evaluation
    compute_multiplier: Auto | Annotated[float, Field(ge=0.00001, le=10)] = "auto"  # scales num_generations
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"  # sets max_completion_length's auto
    num_generations: Auto | Annotated[int, Field(ge=2, le=64)] = "auto"
    beta: Auto | Annotated[float, Field(ge=0, le=10)] = "auto"
    loss_type: Auto | Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "auto"
    max_completion_length: Auto | Annotated[int, Field(ge=1, le=131_072)] = "auto"
    temperature: Auto | Annotated[float, Field(gt=0, le=2)] = "auto"
    top_p: Auto | Annotated[float, Field(gt=0, le=1)] = "auto"


AnyHyperparameters = SupervisedHyperparameters | ReinforcementHyperparameters


class SupervisedMethod(_Strict):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DPOMethod(_Strict):
    hyperparameters: DPOHyperparameters = Field(default_factory=DPOHyperparameters)


class ReinforcementMethod(_Strict):
    # OpenAI's grader JSON; checked by the engine's grader schema (unsloth_core.graders), which names the bad field.
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters = Field(default_factory=ReinforcementHyperparameters)


class Method(_Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DPOMethod | None = None
    reinforcement: ReinforcementMethod | None = None


class WandbIntegration(BaseModel):
    model_config = ConfigDict(strict=True)

    project: Text
    entity: Text | None = None
    name: Text | None = None
    tags: list[Text] | None = None


class Integration(_Strict):
    type: Literal["wandb"]
    wandb: WandbIntegration


class JobCreate(_Strict):
    model: Annotated[Identifier, StringConstraints(min_length=1, max_length=256)]
    training_file: Annotated[Identifier, StringConstraints(min_length=1, max_length=64)]
    validation_file: Annotated[Identifier, StringConstraints(min_length=1, max_length=64)] | None = None
    suffix: Annotated[str, StringConstraints(pattern=SUFFIX_PATTERN)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    method: Method | None = None
    hyperparameters: LegacyHyperparameters | None = None
    integrations: list[Integration] | None = None


# ---- responses ----


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    model: str
    organization_id: str
    status: str
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    result_files: list[str] = Field(default_factory=list)
    seed: int
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    # extensions
    suffix: str | None = None
    stop_requested: str | None = None
    progress: dict[str, Any] | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool


class JobEventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventObject]
    has_more: bool


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]
    # extension: the probe prompts with this checkpoint's greedy answers ({prompt, output, finish_reason})
    samples: list[dict[str, Any]] | None = None


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class ValidationIssue(BaseModel):
    param: str | None
    code: str
    message: str
    line: int | None = None


class JobValidation(BaseModel):
    """`POST /v1/fine_tuning/jobs/validate`: what a create with this body would do, before anything is queued."""

    object: Literal["fine_tuning.job.validation"] = "fine_tuning.job.validation"
    valid: bool
    errors: list[ValidationIssue]
    model: str
    training_file: dict[str, Any] | None = None  # the engine's report with the base model's tokenizer
    validation_file: dict[str, Any] | None = None
    method: dict[str, Any] | None = None  # "auto" resolved
    hyperparameters: dict[str, Any] | None = None
    n_examples: int | None = None
    n_tokens: int | None = None
    n_truncated: int | None = None
    estimated_steps: int | None = None
    estimated_trained_tokens: int | None = None
