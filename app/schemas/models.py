from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # lineage, as vLLM reports adapters: the model it was trained from, and the base model underneath
    parent: str | None = None
    root: str
    # extensions
    kind: Literal["base", "fine_tune", "checkpoint"]
    fine_tuning_job_id: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool
