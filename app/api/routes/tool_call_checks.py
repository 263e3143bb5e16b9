from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import StrictRoute
from app.schemas.tool_call_checks import ToolCallCheck, ToolCallCheckRequest
from app.services import models, tool_call_checks

router = APIRouter(tags=["tool-call checks"], route_class=StrictRoute)


def _prepare(ctx: CtxDep, session: SessionDep, key: CurrentKey, body: ToolCallCheckRequest
             ) -> tuple[models.Servable, list[tool_call_checks.Turn]]:
    try:
        servable = models.resolve_servable(session=session, settings=ctx.settings, key=key, model_id=body.model)
        return servable, tool_call_checks.turns_of(session=session, settings=ctx.settings, key=key, body=body)
    finally:
        session.close()  # give the connection back before generating


@router.post("/tool_call_checks")
async def create_tool_call_check(body: ToolCallCheckRequest, request: Request, ctx: CtxDep, session: SessionDep,
                                 key: CurrentKey) -> ToolCallCheck:
    """Ask the model each tool-calling turn of the conversations (greedy, with their tools, as any chat completion
    is served) and report the share of replies whose calls validate against the functions' schemas."""
    servable, turns = await run_in_threadpool(_prepare, ctx, session, key, body)
    return await tool_call_checks.check(engine=ctx.inference, request=request, servable=servable, body=body,
                                        turns=turns, key_id=key.id)
