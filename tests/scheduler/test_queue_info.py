"""A queued job's estimated place in the fair-share order and its estimated start."""

import uuid
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from scheduler import job_store, queue_info, states
from scheduler.models import Job
from scheduler.schemas import JobSpec, QueueInfo, Resources


def spec(gpus: int = 1, priority: int = 0) -> JobSpec:
    return JobSpec(
        image="x",
        command=["true"],
        max_duration_s=60,
        priority=priority,
        resources=Resources(gpus=gpus),
    )


async def add_jobs(
    db: async_sessionmaker,
    owner: str,
    count: int,
    start: datetime,
    *,
    priority: int = 0,
    gpus: int = 1,
    status: str = states.QUEUED,
    assigned_ago_s: float | None = None,
) -> list[str]:
    """`count` jobs of `owner`, created a second apart from `start`; their ids in order."""
    async with db.begin() as session:
        jobs = []
        for i in range(count):
            job = job_store.new_job(owner, spec(gpus, priority))
            job.id = str(uuid.uuid4())
            job.status = status
            job.created_at = start + timedelta(seconds=i)
            if assigned_ago_s is not None:
                job.assigned_at = func.now() - timedelta(seconds=assigned_ago_s)
            jobs.append(job)
        session.add_all(jobs)
    return [j.id for j in jobs]


async def info(db: async_sessionmaker, job_id: str) -> QueueInfo | None:
    async with db() as session:
        job = await session.get(Job, job_id)
        assert job is not None
        return await queue_info.queue_info(session, job)


async def position(db: async_sessionmaker, job_id: str) -> int:
    result = await info(db, job_id)
    assert result is not None
    return result.position


async def db_now(db: async_sessionmaker) -> datetime:
    async with db() as session:
        return await session.scalar(select(func.now()))


def owner() -> str:
    return str(uuid.uuid4())


class TestPosition:
    async def test_one_requester_goes_by_priority_then_fifo(self, db: async_sessionmaker) -> None:
        me, t0 = owner(), await db_now(db) - timedelta(hours=1)
        fifo = await add_jobs(db, me, 4, t0)
        [urgent] = await add_jobs(db, me, 1, t0 + timedelta(minutes=5), priority=5)
        assert await position(db, urgent) == 0
        assert [await position(db, j) for j in fifo] == [1, 2, 3, 4]

    async def test_equal_created_at_is_ordered_by_id(self, db: async_sessionmaker) -> None:
        me, t0 = owner(), await db_now(db) - timedelta(hours=1)
        ids = [*await add_jobs(db, me, 1, t0), *await add_jobs(db, me, 1, t0)]
        assert sorted([await position(db, j) for j in ids]) == [0, 1]
        assert await position(db, min(ids)) == 0

    async def test_a_burst_does_not_hold_back_another_requesters_job(
        self, db: async_sessionmaker
    ) -> None:
        burst_owner, single_owner = owner(), owner()
        t0 = await db_now(db) - timedelta(hours=1)
        burst = await add_jobs(db, burst_owner, 50, t0)
        [single] = await add_jobs(db, single_owner, 1, t0 + timedelta(minutes=5))
        # The burst's first job wins the tie at zero GPUs each, then the single job goes.
        assert await position(db, single) == 1
        assert await position(db, burst[0]) == 0
        assert await position(db, burst[1]) == 2
        assert await position(db, burst[-1]) == 50

    async def test_two_requesters_interleave(self, db: async_sessionmaker) -> None:
        a, b = owner(), owner()
        t0 = await db_now(db) - timedelta(hours=1)
        a_jobs = await add_jobs(db, a, 10, t0)
        b_jobs = await add_jobs(db, b, 10, t0 + timedelta(minutes=1))
        # a0 b0 a1 b1 ...: a's k-th job after 2k jobs, b's after 2k + 1.
        assert [await position(db, j) for j in a_jobs] == list(range(0, 20, 2))
        assert [await position(db, j) for j in b_jobs] == list(range(1, 20, 2))

    async def test_gpus_held_push_a_requester_back(self, db: async_sessionmaker) -> None:
        busy, idle = owner(), owner()
        t0 = await db_now(db) - timedelta(hours=1)
        [busy_job] = await add_jobs(db, busy, 1, t0)
        await add_jobs(db, idle, 5, t0 + timedelta(minutes=1))
        assert await position(db, busy_job) == 0
        await add_jobs(db, busy, 1, t0, gpus=3, status=states.RUNNING)
        # The idle requester gets jobs until it holds about as many GPUs (3).
        assert await position(db, busy_job) == 3

    async def test_gpus_ahead_count_by_size(self, db: async_sessionmaker) -> None:
        big, small = owner(), owner()
        t0 = await db_now(db) - timedelta(hours=1)
        big_jobs = await add_jobs(db, big, 2, t0, gpus=4)
        await add_jobs(db, small, 10, t0 + timedelta(minutes=1))
        # Before big's second job, big holds 4 GPUs: small gets 4 one-GPU jobs first.
        assert await position(db, big_jobs[1]) == 1 + 4

    async def test_only_queued_jobs_have_queue_info(self, db: async_sessionmaker) -> None:
        t0 = await db_now(db)
        [running] = await add_jobs(db, owner(), 1, t0, status=states.RUNNING)
        assert await info(db, running) is None


class TestEstimatedStart:
    async def test_none_without_recent_placements(self, db: async_sessionmaker) -> None:
        t0 = await db_now(db) - timedelta(hours=1)
        [job] = await add_jobs(db, owner(), 1, t0)
        # Placements long ago say nothing about the rate now.
        await add_jobs(db, owner(), 5, t0, status=states.SUCCEEDED, assigned_ago_s=3600)
        result = await info(db, job)
        assert result is not None and result.estimated_start_at is None

    async def test_from_the_recent_placement_rate(self, db: async_sessionmaker) -> None:
        me, t0 = owner(), await db_now(db) - timedelta(hours=1)
        jobs = await add_jobs(db, me, 3, t0)
        # 30 placements in the last 5 minutes: one every 10 s.
        await add_jobs(db, owner(), 30, t0, status=states.SUCCEEDED, assigned_ago_s=60)
        now = await db_now(db)
        result = await info(db, jobs[2])
        assert result is not None and result.position == 2
        assert result.estimated_start_at is not None
        expected = now + timedelta(seconds=30)
        assert abs((result.estimated_start_at - expected).total_seconds()) < 5

    async def test_a_busy_fleet_is_measured_over_its_last_placements(
        self, db: async_sessionmaker
    ) -> None:
        t0 = await db_now(db) - timedelta(hours=1)
        [job] = await add_jobs(db, owner(), 1, t0)
        # 1,000 placements, all 10 s ago: about 100 a second, not 1,000 per 5 minutes.
        await add_jobs(
            db, owner(), queue_info.RATE_SAMPLE, t0, status=states.SUCCEEDED, assigned_ago_s=10
        )
        now = await db_now(db)
        result = await info(db, job)
        assert result is not None and result.estimated_start_at is not None
        assert (result.estimated_start_at - now).total_seconds() < 1

    async def test_not_before_a_retry_backoff(self, db: async_sessionmaker) -> None:
        t0 = await db_now(db) - timedelta(hours=1)
        [job] = await add_jobs(db, owner(), 1, t0)
        await add_jobs(db, owner(), 30, t0, status=states.SUCCEEDED, assigned_ago_s=60)
        later = await db_now(db) + timedelta(hours=2)
        async with db.begin() as session:
            row = await session.get(Job, job)
            assert row is not None
            row.not_before = later
        result = await info(db, job)
        assert result is not None and result.estimated_start_at == later

    async def test_none_when_the_fleet_can_never_run_it(self, db: async_sessionmaker) -> None:
        t0 = await db_now(db) - timedelta(hours=1)
        [job] = await add_jobs(db, owner(), 1, t0)
        await add_jobs(db, owner(), 30, t0, status=states.SUCCEEDED, assigned_ago_s=60)
        async with db.begin() as session:
            row = await session.get(Job, job)
            assert row is not None
            row.waiting_reason = "no provider in the fleet has a GPU H100"
        result = await info(db, job)
        assert result is not None and result.estimated_start_at is None
