"""job_store.write_changed: the scheduler's batches write their jobs in one UPDATE."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from scheduler import job_store, states
from scheduler.models import Job
from tests.fixtures.database import statements
from tests.scheduler.placing import load, submit

COLUMNS = ("status", "gpu_uuids", "avoid_providers", "price_per_gpu_hour", "assigned_at")


async def jobs(db: async_sessionmaker, n: int) -> list[str]:
    async with db.begin() as session:
        return [(await submit(session, resources={"gpus": 1})).id for _ in range(n)]


async def test_each_job_gets_its_own_values_in_one_statement(db: async_sessionmaker) -> None:
    ids = await jobs(db, 4)
    now = datetime.now(UTC)
    # JSON lists of different lengths, empty among them: each is one value, not a
    # dimension of the array the rows travel in.
    uuids = [[], ["GPU-a"], ["GPU-b", "GPU-c"], ["GPU-d", "GPU-e", "GPU-f"]]
    with statements(db) as sent:
        async with db.begin() as session:
            loaded = (await session.scalars(select(Job).where(Job.id.in_(ids)))).all()
            by_id = {job.id: job for job in loaded}
            for i, job_id in enumerate(ids[:3]):
                job = by_id[job_id]
                job.status = states.ASSIGNED
                job.gpu_uuids = uuids[i + 1]
                job.avoid_providers = [str(i)] * i
                job.price_per_gpu_hour = Decimal(i) / 4
                job.assigned_at = now
            await job_store.write_changed(session, loaded, COLUMNS)
    assert sum(s.startswith("UPDATE") for s in sent) == 1
    for i, job_id in enumerate(ids[:3]):
        job = await load(db, job_id)
        assert (job.status, job.gpu_uuids, job.avoid_providers) == (
            states.ASSIGNED,
            uuids[i + 1],
            [str(i)] * i,
        )
        assert (job.price_per_gpu_hour, job.assigned_at) == (Decimal(i) / 4, now)
    untouched = await load(db, ids[3])
    assert (untouched.status, untouched.assigned_at) == (states.QUEUED, None)


async def test_a_change_outside_the_columns_is_refused_not_lost(db: async_sessionmaker) -> None:
    [job_id] = await jobs(db, 1)
    async with db() as session:
        job = await session.get(Job, job_id)
        job.status = states.ASSIGNED
        job.log_tail = "not among the columns"
        with pytest.raises(ValueError, match="log_tail"):
            await job_store.write_changed(session, [job], COLUMNS)
    assert (await load(db, job_id)).status == states.QUEUED


async def test_nothing_changed_sends_nothing(db: async_sessionmaker) -> None:
    ids = await jobs(db, 2)
    with statements(db) as sent:
        async with db.begin() as session:
            loaded = (await session.scalars(select(Job).where(Job.id.in_(ids)))).all()
            await job_store.write_changed(session, loaded, COLUMNS)
    assert not any(s.startswith("UPDATE") for s in sent)
