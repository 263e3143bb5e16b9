from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import StrictRoute
from app.schemas.completions import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest
from app.services import completions, models

router = APIRouter(tags=["completions"], route_class=StrictRoute)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _resolve(ctx: CtxDep, session: SessionDep, key: CurrentKey, model_id: str) -> models.Servable:
    try:
        return models.resolve_servable(session=session, settings=ctx.settings, key=key, model_id=model_id)
    finally:
        session.close()  # give the connection back before generating (which can take minutes)


def _respond(result: Any) -> Any:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)
    return result


@router.post("/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, request: Request, ctx: CtxDep, session: SessionDep,
                            key: CurrentKey) -> Any:
    servable = await run_in_threadpool(_resolve, ctx, session, key, body.model)
    return _respond(await completions.complete(engine=ctx.inference, request=request, servable=servable, body=body,
                                               key_id=key.id))


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, ctx: CtxDep, session: SessionDep,
                                 key: CurrentKey) -> Any:
    servable = await run_in_threadpool(_resolve, ctx, session, key, body.model)
    return _respond(await completions.complete(engine=ctx.inference, request=request, servable=servable, body=body,
                                               key_id=key.id))
