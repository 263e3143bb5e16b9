"""API keys over the API (`/v1/organization/admin_api_keys`), in the shape of OpenAI's admin API keys."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StringConstraints

from app.schemas.common import Identifier


class AdminApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # a label shown in lists and by `unsloth keys list` (tab-separated there, so no control characters)
    name: Annotated[Identifier, StringConstraints(min_length=1, max_length=128)]
    admin: StrictBool = False  # an admin key sees every key's objects and may manage keys


class AdminApiKeyOwner(BaseModel):
    """Whom the key acts for. Here a key is its own principal (it owns the files, jobs and models it makes), so the
    owner is the key itself, as OpenAI describes a service account's key."""

    type: Literal["service_account"] = "service_account"
    object: Literal["organization.service_account"] = "organization.service_account"
    id: str
    name: str
    created_at: int
    role: Literal["owner", "member"]  # owner: an admin key


class AdminApiKey(BaseModel):
    id: str
    object: Literal["organization.admin_api_key"] = "organization.admin_api_key"
    name: str
    redacted_value: str  # the key's first characters: enough to tell keys apart, never enough to use one
    created_at: int
    last_used_at: int | None
    owner: AdminApiKeyOwner
    admin: bool  # extension: whether the key is an admin key


class AdminApiKeyCreated(AdminApiKey):
    value: str  # the key itself: returned by create only, once; the server keeps its SHA-256


class AdminApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdminApiKey]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class AdminApiKeyDeleted(BaseModel):
    id: str
    object: Literal["organization.admin_api_key.deleted"] = "organization.admin_api_key.deleted"
    deleted: bool
