from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import StrictRoute
from app.schemas.graders import GraderRunRequest, GraderRunResponse, GraderValidateRequest, GraderValidateResponse
from app.services import graders
from app.services.judge import ServedJudge

router = APIRouter(prefix="/fine_tuning/alpha/graders", tags=["fine-tuning"], route_class=StrictRoute)


@router.post("/validate")
def validate_grader(body: GraderValidateRequest, ctx: CtxDep, session: SessionDep,
                    key: CurrentKey) -> GraderValidateResponse:
    """The grader as parsed, or a 400 naming its field; also checks it can run here (python allowed, judges served)."""
    return graders.validate(session=session, settings=ctx.settings, key=key, payload=body)


def _check(ctx: CtxDep, session: SessionDep, key: CurrentKey, body: GraderRunRequest) -> graders.CheckedGrader:
    try:
        return graders.check(session=session, settings=ctx.settings, key=key, obj=body.grader)
    finally:
        session.close()  # give the connection back before grading (a judge generates, a python grader runs)


@router.post("/run")
async def run_grader(body: GraderRunRequest, request: Request, ctx: CtxDep, session: SessionDep,
                     key: CurrentKey) -> GraderRunResponse:
    """Grade `model_sample` against `item`: the reward, OpenAI's error flags, sub-graders' rewards."""
    checked = await run_in_threadpool(_check, ctx, session, key, body)
    judge = ServedJudge(engine=ctx.inference, servables=checked.judges, request=request, key_id=key.id)
    return await run_in_threadpool(graders.run, checked=checked, payload=body, settings=ctx.settings, judge=judge)
