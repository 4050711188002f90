"""The gateway's provider-side logic: a machine's status as the platform sees it, and
the owner's drain, resume, prices and leave, shared by the owner's and the daemon's
routes."""

from sqlalchemy.ext.asyncio import async_sessionmaker

from billing import reports
from gateway.clients import ServiceClient
from gateway.schemas import ProviderStatus, RunningTask
from provider_registry.schemas import PriceChange
from scheduler import job_store


async def provider_status(
    db: async_sessionmaker, registry: ServiceClient, provider_id: str
) -> ProviderStatus:
    provider = await registry.request("GET", f"/internal/providers/{provider_id}")
    async with db() as session:
        work = await job_store.provider_work(session, provider_id)
        earned = await reports.machine_earnings(session, provider_id)
    return ProviderStatus(
        provider=provider,
        running_tasks=[
            RunningTask(
                job_id=job.id,
                attempt=job.attempt,
                status=job.status,
                gpu_uuids=job.gpu_uuids,
                assigned_at=job.assigned_at,
                started_at=job.started_at,
            )
            for job in work.running
        ],
        tasks_ended=work.tasks_ended,
        earned=earned,
    )


async def set_drain(registry: ServiceClient, provider_id: str, drain: bool) -> dict:
    action = "drain" if drain else "resume"
    return await registry.request("POST", f"/internal/providers/{provider_id}/{action}")


async def set_prices(registry: ServiceClient, provider_id: str, change: PriceChange) -> dict:
    return await registry.request(
        "PUT", f"/internal/providers/{provider_id}/prices", json=change.model_dump(mode="json")
    )


async def leave(auth: ServiceClient, registry: ServiceClient, provider_id: str) -> dict:
    """Off the registry first (refused while tasks run), then the credential, so a
    refused leave leaves the daemon working."""
    provider = await registry.request("POST", f"/internal/providers/{provider_id}/leave")
    await auth.request("POST", f"/internal/providers/{provider_id}/credentials/revoke")
    return provider
