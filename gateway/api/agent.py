"""Routes for provider daemons, authenticated by their agent credential."""

from fastapi import APIRouter, Depends, Query
from sqlalchemy.ext.asyncio import async_sessionmaker

from gateway import fleet, jobs
from gateway.api import deps
from gateway.clients import ServiceClient
from gateway.schemas import (
    AgentInput,
    AgentOutputsRequest,
    AgentOutputsResponse,
    ProviderStatus,
    UploadUrl,
)
from gateway.security import Agent, current_agent
from gateway.storage import presign
from provider_registry.schemas import PriceChange, ProviderOut
from scheduler import job_store

router = APIRouter(prefix="/v1/agent", tags=["agent"])


@router.get("/jobs/{job_id}/inputs", response_model=list[AgentInput])
async def task_inputs(
    job_id: str,
    attempt: int = Query(ge=0),
    agent: Agent = Depends(current_agent),
    db: async_sessionmaker = Depends(deps.db),
    storage: ServiceClient = Depends(deps.storage),
) -> list[AgentInput]:
    """Short-lived download URLs for the inputs of a task sent to this provider."""
    job = await jobs.job_for_agent(db, job_id, agent.provider_id, attempt)
    result = []
    for item in job.inputs:
        f = await storage.request(
            "GET", f"/internal/files/{item['file_id']}", params={"owner_id": job.owner_id}
        )
        result.append(
            AgentInput(
                file_id=f["file_id"],
                path=item["path"],
                size=f["size"],
                download_url=f["download_url"],
            )
        )
    return result


@router.post("/jobs/{job_id}/outputs", response_model=AgentOutputsResponse)
async def task_outputs(
    job_id: str,
    body: AgentOutputsRequest,
    agent: Agent = Depends(current_agent),
    db: async_sessionmaker = Depends(deps.db),
    storage: ServiceClient = Depends(deps.storage),
) -> AgentOutputsResponse:
    """Upload URLs, one object each, for a task's outputs and its full log."""
    job = await jobs.job_for_agent(db, job_id, agent.provider_id, body.attempt)
    keys = [job_store.output_key(job.id, job.attempt, f.path) for f in body.files]
    urls, _ = await presign(storage, "outputs", keys, "PUT")
    [log_url], _ = await presign(storage, "logs", [job_store.log_key(job.id, job.attempt)], "PUT")
    return AgentOutputsResponse(
        uploads=[
            UploadUrl(path=f.path, upload_url=u) for f, u in zip(body.files, urls, strict=True)
        ],
        log_upload_url=log_url,
    )


@router.get("/provider", response_model=ProviderStatus)
async def provider_status(
    agent: Agent = Depends(current_agent),
    db: async_sessionmaker = Depends(deps.db),
    registry: ServiceClient = Depends(deps.registry),
) -> ProviderStatus:
    """This machine as the platform sees it: GPUs, state, running tasks, earnings."""
    return await fleet.provider_status(db, registry, agent.provider_id)


@router.post("/provider/drain", response_model=ProviderOut)
async def drain(
    agent: Agent = Depends(current_agent), registry: ServiceClient = Depends(deps.registry)
) -> dict:
    """Running tasks finish; no new task is placed here until resume."""
    return await fleet.set_drain(registry, agent.provider_id, True)


@router.post("/provider/resume", response_model=ProviderOut)
async def resume(
    agent: Agent = Depends(current_agent), registry: ServiceClient = Depends(deps.registry)
) -> dict:
    return await fleet.set_drain(registry, agent.provider_id, False)


@router.put("/provider/prices", response_model=ProviderOut)
async def set_prices(
    body: PriceChange,
    agent: Agent = Depends(current_agent),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    """New prices per GPU-hour by model for this machine (`provider-daemon price set`)."""
    return await fleet.set_prices(registry, agent.provider_id, body)


@router.post("/provider/leave", response_model=ProviderOut)
async def leave(
    agent: Agent = Depends(current_agent),
    auth: ServiceClient = Depends(deps.auth),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    """Takes this machine off the platform for good and ends its credential; refused
    (409) while tasks still run here."""
    return await fleet.leave(auth, registry, agent.provider_id)
