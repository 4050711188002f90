import uuid
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request, status
from fastapi.responses import PlainTextResponse
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import async_sessionmaker
from sse_starlette.sse import EventSourceResponse

from billing.settings import BillingSettings
from common import subjects
from common.messages import TaskCancel
from gateway import jobs
from gateway.api import deps
from gateway.clients import ServiceClient
from gateway.schemas import JobArrayOut, JobArrayRequest, OutputOut
from gateway.security import Principal, require
from gateway.submissions import SubmissionBatcher
from scheduler import job_store, queue_info, states
from scheduler.schemas import JobOut, JobSpec

router = APIRouter(tags=["jobs"])
Requester = Depends(require("requester"))


@router.post("/v1/jobs", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut)
async def submit_job(
    spec: JobSpec,
    principal: Principal = Requester,
    batcher: SubmissionBatcher = Depends(deps.submissions),
    storage: ServiceClient = Depends(deps.storage),
) -> JobOut:
    """Queues the job and holds its worst case (GPUs x price ceiling x max_duration_s)
    from the requester's credits; 402 says how much is missing."""
    return await jobs.submit_job(batcher, storage, principal.id, spec)


@router.post("/v1/jobs/batch", status_code=status.HTTP_202_ACCEPTED, response_model=JobArrayOut)
async def submit_job_array(
    body: JobArrayRequest,
    principal: Principal = Requester,
    batcher: SubmissionBatcher = Depends(deps.submissions),
    storage: ServiceClient = Depends(deps.storage),
) -> JobArrayOut:
    """A job array: `{"jobs": [spec, ...]}` or `{"template": spec, "count": n}`, up to
    1,000 jobs, accepted all together or not at all (402 if the holds aren't covered)."""
    return await jobs.submit_array(batcher, storage, principal.id, body)


@router.get("/v1/jobs", response_model=list[JobOut])
async def list_jobs(
    status_filter: Literal[states.ALL] | None = Query(default=None, alias="status"),  # type: ignore[valid-type]
    array: uuid.UUID | None = Query(default=None, description="one job array, in index order"),
    limit: int = Query(default=100, ge=1, le=1000),
    principal: Principal = Requester,
    db: async_sessionmaker = Depends(deps.db),
) -> list[JobOut]:
    async with db() as session:
        rows = await job_store.list_jobs(
            session,
            principal.owner_filter(),
            status_filter,
            limit,
            array_id=str(array) if array is not None else None,
        )
        return await job_store.jobs_out(session, rows)


@router.get("/v1/jobs/{job_id}", response_model=JobOut)
async def get_job(
    job_id: str, principal: Principal = Requester, db: async_sessionmaker = Depends(deps.db)
) -> JobOut:
    """The job; a queued one says where it stands (`queue`: an estimate)."""
    async with db() as session:
        job = await job_store.get_job(session, job_id, principal.owner_filter())
        [out] = await job_store.jobs_out(session, [job])
        out.queue = await queue_info.queue_info(session, job)
        return out


@router.get("/v1/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    request: Request,
    principal: Principal = Requester,
    db: async_sessionmaker = Depends(deps.db),
    js: JetStreamContext = Depends(deps.js),
    nc: NatsClient = Depends(deps.nc),
) -> EventSourceResponse:
    """Server-Sent Events, then `end` (`{"status"}`) once the job is over:

    - `status`: the job (as `GET /v1/jobs/{id}`) on each state change;
    - `pull`: while the machine pulls the job's image, at most ~2 a second and then a last
      one with `status` "done" or "failed": `{"job_id", "attempt", "image", "status": "pulling" |
      "done" | "failed", "layers_done", "layers_total", "bytes_done", "bytes_total"}`
      (bytes over the layers whose size is known so far, so totals may grow). Live only:
      a pull that ended before the stream was opened is not replayed;
    - `log`: `{"attempt", "line"}` per line of output, from the first line.
    """
    async with db() as session:
        await job_store.get_job(session, job_id, principal.owner_filter())  # 404 before streaming
    poll_s = request.app.state.settings.sse_poll_interval_s
    return EventSourceResponse(
        jobs.stream_events(db, js, nc, job_id, principal.owner_filter(), poll_s), ping=15
    )


@router.get("/v1/jobs/{job_id}/logs", response_class=PlainTextResponse)
async def job_logs(
    job_id: str,
    principal: Principal = Requester,
    db: async_sessionmaker = Depends(deps.db),
    js: JetStreamContext = Depends(deps.js),
    storage: ServiceClient = Depends(deps.storage),
) -> str:
    return await jobs.read_logs(db, js, storage, job_id, principal.owner_filter())


@router.get("/v1/jobs/{job_id}/outputs", response_model=list[OutputOut])
async def job_outputs(
    job_id: str,
    principal: Principal = Requester,
    db: async_sessionmaker = Depends(deps.db),
    storage: ServiceClient = Depends(deps.storage),
) -> list[dict]:
    return await jobs.output_urls(db, storage, job_id, principal.owner_filter())


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut)
async def cancel_job(
    job_id: str,
    principal: Principal = Requester,
    db: async_sessionmaker = Depends(deps.db),
    js: JetStreamContext = Depends(deps.js),
    billing: BillingSettings = Depends(deps.billing),
) -> JobOut:
    async with db.begin() as session:
        job = await job_store.request_cancel(session, job_id, principal.owner_filter(), billing)
        [out] = await job_store.jobs_out(session, [job])
    if job.provider_id is not None and job.finished_at is None:
        cancel = TaskCancel(job_id=job.id, attempt=job.attempt)
        await js.publish(
            subjects.tasks_subject(job.provider_id),
            cancel.model_dump_json().encode(),
            headers={"Nats-Msg-Id": subjects.msg_id(job.id, job.attempt, "cancel")},
        )
    return out
