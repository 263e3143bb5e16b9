from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.api.deps import CtxDep, CurrentKey, SessionDep
from app.api.routing import IdempotencyKey, PathId, QueryId, RetryCount, StrictRoute
from app.schemas.jobs import CheckpointList, FineTuningJob, JobCreate, JobEventList, JobList, JobValidation
from app.schemas.rollouts import RolloutList
from app.services import jobs, rollouts
from app.services.event_stream import stream_events

router = APIRouter(prefix="/fine_tuning/jobs", tags=["fine-tuning"], route_class=StrictRoute)

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("")
def create_job(body: JobCreate, ctx: CtxDep, session: SessionDep, key: CurrentKey,
               idempotency_key: IdempotencyKey = None, retry_count: RetryCount = None) -> FineTuningJob:
    job = jobs.create_job(session=session, settings=ctx.settings, broker=ctx.broker, key=key, payload=body,
                          idempotency_key=idempotency_key, retry_count=retry_count)
    return jobs.job_object(job)


@router.post("/validate")
def validate_job(body: JobCreate, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> JobValidation:
    """A dry-run of create: every problem, per-line errors, token counts, truncations, estimated steps."""
    return jobs.validate_job(session=session, settings=ctx.settings, key=key, payload=body)


@router.get("")
def list_jobs(request: Request, session: SessionDep, key: CurrentKey, after: QueryId = None,
              limit: Limit = 20) -> JobList:
    metadata = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
                if k.startswith("metadata[") and k.endswith("]")}
    return jobs.list_jobs(session=session, key=key, after=after, limit=limit, metadata=metadata)


@router.get("/{job_id:job_id}")
def retrieve_job(job_id: PathId, session: SessionDep, key: CurrentKey) -> FineTuningJob:
    return jobs.job_object(jobs.get_job(session=session, key=key, job_id=job_id))


@router.post("/{job_id:job_id}/cancel")
def cancel_job(job_id: PathId, session: SessionDep, key: CurrentKey) -> FineTuningJob:
    return jobs.job_object(jobs.cancel_job(session=session, key=key, job_id=job_id))


@router.post("/{job_id:job_id}/pause")
def pause_job(job_id: PathId, session: SessionDep, key: CurrentKey) -> FineTuningJob:
    return jobs.job_object(jobs.pause_job(session=session, key=key, job_id=job_id))


@router.post("/{job_id:job_id}/resume")
def resume_job(job_id: PathId, ctx: CtxDep, session: SessionDep, key: CurrentKey) -> FineTuningJob:
    return jobs.job_object(jobs.resume_job(session=session, broker=ctx.broker, key=key, job_id=job_id))


@router.get("/{job_id:job_id}/events", response_model=JobEventList)
async def list_events(job_id: PathId, request: Request, ctx: CtxDep, session: SessionDep, key: CurrentKey,
                      after: QueryId = None, limit: Limit = 20, stream: bool = False) -> Any:
    """Newest first, paged with `after`; `?stream=true` sends them as SSE, oldest first, then live until the job
    ends."""
    job = await run_in_threadpool(lambda: jobs.get_job(session=session, key=key, job_id=job_id))
    if stream:
        await run_in_threadpool(session.close)  # the stream polls with its own short sessions
        return StreamingResponse(stream_events(sessions=ctx.sessions, job_id=job.id, request=request,
                                               poll_s=ctx.settings.event_poll_interval_s, after=after),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await run_in_threadpool(lambda: jobs.list_events(session=session, job=job, after=after, limit=limit))


@router.get("/{job_id:job_id}/checkpoints")
def list_checkpoints(job_id: PathId, session: SessionDep, key: CurrentKey, after: QueryId = None,
                     limit: Limit = 10) -> CheckpointList:
    job = jobs.get_job(session=session, key=key, job_id=job_id)
    return jobs.list_checkpoints(session=session, job=job, after=after, limit=limit)


@router.get("/{job_id:job_id}/rollouts")
def list_rollouts(job_id: PathId, session: SessionDep, key: CurrentKey, after: QueryId = None, limit: Limit = 10,
                  step: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None) -> RolloutList:
    """A reinforcement job's sampled prompts with their completions and rewards, newest first; `step` keeps one
    logged step's."""
    job = jobs.get_job(session=session, key=key, job_id=job_id)
    return rollouts.list_rollouts(session=session, job=job, after=after, limit=limit, step=step)
