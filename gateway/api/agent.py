"""Routes for provider daemons, authenticated by their agent credential."""

import asyncio

from fastapi import APIRouter, Depends, Query, Response, status
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker

from common.errors import Invalid
from gateway import fleet, jobs
from gateway.api import deps
from gateway.auth_cache import Change
from gateway.clients import ServiceClient, ServiceUnavailable
from gateway.schemas import (
    AgentCompleteRequest,
    AgentInput,
    AgentOutputsRequest,
    AgentOutputsResponse,
    AgentUploadRef,
    CompletedOutput,
    MultipartUpload,
    ProviderStatus,
    UploadUrl,
)
from gateway.security import Agent, current_agent
from gateway.storage import abort_upload, complete_upload, plan_uploads
from provider_registry.schemas import PriceChange, ProviderOut
from scheduler import job_store
from storage_service.schemas import ObjectToUpload, PlannedUpload

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
                sha256=f.get("sha256"),
                download_url=f["download_url"],
            )
        )
    return result


def _output_objects(job_id: str, attempt: int, body: AgentOutputsRequest) -> list[ObjectToUpload]:
    objects = []
    for i, f in enumerate(body.files):
        key = job_store.output_key(job_id, attempt, f.path)
        try:
            objects.append(ObjectToUpload(key=key, size=f.size, sha256=f.sha256))
        except ValidationError as exc:
            field = ".".join(str(p) for p in exc.errors()[0]["loc"])
            raise Invalid(exc.errors()[0]["msg"], field=f"files.{i}.{field}") from None
    return objects


def _upload_url(path: str, planned: PlannedUpload) -> UploadUrl:
    multipart = None
    if planned.multipart is not None:
        multipart = MultipartUpload.model_validate(planned.multipart.model_dump())
    return UploadUrl(path=path, upload_url=planned.url, multipart=multipart)


@router.post("/jobs/{job_id}/outputs", response_model=AgentOutputsResponse)
async def task_outputs(
    job_id: str,
    body: AgentOutputsRequest,
    agent: Agent = Depends(current_agent),
    db: async_sessionmaker = Depends(deps.db),
    storage: ServiceClient = Depends(deps.storage),
) -> AgentOutputsResponse:
    """Upload URLs, one object each, for a task's outputs and its full log: a single PUT
    bound to the file's sha256, or parts for a big file. They count against the job
    owner's storage quota but are never refused for it (a finished job's results are
    kept)."""
    job = await jobs.job_for_agent(db, job_id, agent.provider_id, body.attempt)
    objects = _output_objects(job.id, job.attempt, body)
    log_object = ObjectToUpload(key=job_store.log_key(job.id, job.attempt), size=body.log_size or 0)
    log_plan = plan_uploads(storage, job.owner_id, "logs", [log_object])
    uploads: list[UploadUrl] = []
    if objects:
        outputs, logs = await asyncio.gather(
            plan_uploads(storage, job.owner_id, "outputs", objects), log_plan
        )
        uploads = [_upload_url(f.path, p) for f, p in zip(body.files, outputs.uploads, strict=True)]
        expires_at = min(outputs.expires_at, logs.expires_at)
    else:
        logs = await log_plan
        expires_at = logs.expires_at
    [log_upload] = logs.uploads
    if log_upload.url is None:
        raise ServiceUnavailable("storage gave no single upload URL for the log")
    return AgentOutputsResponse(
        uploads=uploads, log_upload_url=log_upload.url, expires_at=expires_at
    )


@router.post("/jobs/{job_id}/outputs/complete", response_model=CompletedOutput)
async def complete_output(
    job_id: str,
    body: AgentCompleteRequest,
    agent: Agent = Depends(current_agent),
    db: async_sessionmaker = Depends(deps.db),
    storage: ServiceClient = Depends(deps.storage),
) -> CompletedOutput:
    """Joins the parts of a big output, all sent, into the object; answers its size."""
    job = await jobs.job_for_agent(db, job_id, agent.provider_id, body.attempt)
    key = job_store.output_key(job.id, job.attempt, body.path)
    done = await complete_upload(storage, "outputs", key, body.upload_id, body.parts)
    return CompletedOutput(path=body.path, size=done.size)


@router.post("/jobs/{job_id}/outputs/abort", status_code=status.HTTP_204_NO_CONTENT)
async def abort_output(
    job_id: str,
    body: AgentUploadRef,
    agent: Agent = Depends(current_agent),
    db: async_sessionmaker = Depends(deps.db),
    storage: ServiceClient = Depends(deps.storage),
) -> Response:
    """Drops a big output's parts after its upload failed."""
    job = await jobs.job_for_agent(db, job_id, agent.provider_id, body.attempt)
    key = job_store.output_key(job.id, job.attempt, body.path)
    await abort_upload(storage, "outputs", key, body.upload_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


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
    changed: deps.AuthChanged = Depends(deps.auth_changed),
) -> dict:
    """Takes this machine off the platform for good and ends its credential; refused
    (409) while tasks still run here."""
    provider = await fleet.leave(auth, registry, agent.provider_id)
    await changed(Change(provider_id=agent.provider_id))
    return provider
