"""Placement passes on the unit database, the way the scheduler process runs them."""

import uuid

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing.settings import BillingSettings
from scheduler import job_store
from scheduler.fleet_index import FleetIndex, Weights
from scheduler.models import Job
from scheduler.placement import PassResult, Placer
from scheduler.retries import RetryPolicy
from scheduler.schemas import JobSpec

# Retries wait no backoff in these tests unless they say otherwise.
NO_BACKOFF = RetryPolicy(backoff_s=0, backoff_max_s=0)
# The platform's default money rules.
BILLING = BillingSettings(dev_mode=True)


def placer(
    db: async_sessionmaker,
    weights: Weights = Weights(),
    allow_simulated: bool = False,
    batch: int = 200,
) -> Placer:
    return Placer(db, FleetIndex(weights), allow_simulated=allow_simulated, batch=batch, scan=1000)


async def place(db: async_sessionmaker, **kw) -> PassResult:  # type: ignore[no-untyped-def]
    """One pass by a scheduler that just started."""
    return await placer(db, **kw).run_pass()


def spec(**kw) -> JobSpec:  # type: ignore[no-untyped-def]
    resources = kw.pop("resources", {})
    return JobSpec.model_validate(
        {
            "image": "i",
            "command": ["true"],
            "max_duration_s": 60,
            "resources": resources,
            **kw,
        }
    )


async def submit(session: AsyncSession, owner_id: str | None = None, **kw) -> Job:  # type: ignore[no-untyped-def]
    return await job_store.create_job(session, owner_id or str(uuid.uuid4()), spec(**kw))


async def load(db: async_sessionmaker, job_id: str) -> Job:
    async with db() as session:
        return await job_store.get_job(session, job_id)
