from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import PathId, StrictRoute
from app.schemas.models import ModelDeleted, ModelList, ModelObject
from app.services import models

router = APIRouter(prefix="/models", tags=["models"], route_class=StrictRoute)


@router.get("")
def list_models(ctx: CtxDep, session: SessionDep, key: CurrentKey) -> ModelList:
    return models.list_models(session=session, settings=ctx.settings, key=key)


@router.get("/{model_id:path}")
def retrieve_model(model_id: PathId, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> ModelObject:
    row = models.get_model(session=session, settings=ctx.settings, key=key, model_id=model_id)
    return models.model_object(ctx.settings, row)


@router.delete("/{model_id:path}")
def delete_model(model_id: PathId, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> ModelDeleted:
    removed = models.delete_model(session=session, settings=ctx.settings, key=key, model_id=model_id)
    ctx.inference.cache.evict(removed)
    return ModelDeleted(id=model_id, deleted=True)
