"""API keys over the API, for admin keys only: `/v1/organization/admin_api_keys` as OpenAI's admin API keys (list,
create, retrieve, delete), with `admin` to make an admin key. Any other key is answered 403. A new key's secret is in
the create answer only (`Cache-Control: no-store`); delete revokes, at once."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from app.api.deps import CurrentKey, SessionDep
from app.api.routing import PathId, QueryId, StrictRoute
from app.db.models import ApiKey
from app.schemas.admin_keys import (
    AdminApiKey,
    AdminApiKeyCreate,
    AdminApiKeyCreated,
    AdminApiKeyDeleted,
    AdminApiKeyList,
)
from app.schemas.common import ErrorResponse
from app.services import keys

router = APIRouter(prefix="/organization/admin_api_keys", tags=["keys"], route_class=StrictRoute,
                   responses={403: {"model": ErrorResponse, "description": "Not an admin key"}})


def admin_key(key: CurrentKey) -> ApiKey:
    return keys.check_admin(key)


AdminKey = Annotated[ApiKey, Depends(admin_key)]


@router.get("")
def list_keys(session: SessionDep, _: AdminKey, after: QueryId = None,
              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> AdminApiKeyList:
    """Live keys, oldest first, paged with `after`."""
    return keys.list_key_objects(session=session, after=after, limit=limit)


@router.post("")
def create_key(body: AdminApiKeyCreate, response: Response, session: SessionDep, caller: AdminKey
               ) -> AdminApiKeyCreated:
    """A new key; `value` is the key itself, shown this once (only its hash is stored)."""
    response.headers["Cache-Control"] = "no-store"
    return keys.create_key_object(session=session, caller=caller, name=body.name, is_admin=body.admin)


@router.get("/{key_id}")
def retrieve_key(key_id: PathId, session: SessionDep, _: AdminKey) -> AdminApiKey:
    return keys.key_object(keys.get_key(session=session, key_id=key_id))


@router.delete("/{key_id}")
def delete_key(key_id: PathId, session: SessionDep, caller: AdminKey) -> AdminApiKeyDeleted:
    """Revokes the key: its next request is a 401. A key cannot revoke itself (400)."""
    row = keys.revoke_key_by_id(session=session, caller=caller, key_id=key_id)
    return AdminApiKeyDeleted(id=row.id, deleted=True)
