"""Lost providers, deadlines, time limits and cancels, on a real PostgreSQL."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from common.messages import ProviderLost
from provider_registry.models import Gpu
from scheduler import job_store, lifecycle, states
from scheduler.models import Job
from tests.provider_registry.factories import create_provider
from tests.scheduler.placing import BILLING, NO_BACKOFF, load, place, submit
from tests.scheduler.test_events import apply, event


async def held_gpus(db: async_sessionmaker) -> int:
    async with db() as session:
        return await session.scalar(
            select(func.count()).select_from(Gpu).where(Gpu.reserved_job_id.is_not(None))
        )


async def one_placed(db: async_sessionmaker, machines: int = 1, **job) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        for _ in range(machines):
            await create_provider(session, gpus=1)
        created = await submit(session, **job)
    [placed] = (await place(db)).placements
    return created.id, placed.provider_id


async def lose(db: async_sessionmaker, provider_id: str, job_ids: list[str]):  # type: ignore[no-untyped-def]
    lost = ProviderLost(
        provider_id=provider_id,
        at=datetime.now(UTC),
        last_heartbeat_at=datetime.now(UTC) - timedelta(seconds=30),
        job_ids=job_ids,
    )
    async with db.begin() as session:
        return await lifecycle.on_provider_lost(session, lost, NO_BACKOFF, BILLING)


async def backdate(db: async_sessionmaker, job_id: str, **columns) -> None:  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        await session.execute(update(Job).where(Job.id == job_id).values(**columns))


class TestProviderLost:
    async def test_retried_elsewhere_up_to_the_limit_then_failed(
        self, db: async_sessionmaker
    ) -> None:
        job_id, first = await one_placed(db, machines=2, retries=1)
        await apply(db, event(job_id, first, "started"))
        stopped = await lose(db, first, [job_id])
        assert [(s.job_id, s.attempt, s.provider_id) for s in stopped] == [(job_id, 0, first)]
        job = await load(db, job_id)
        assert (job.status, job.attempt, job.avoid_providers) == (states.QUEUED, 1, [first])
        assert await held_gpus(db) == 0
        # Replayed: nothing changes twice.
        assert await lose(db, first, [job_id]) == []
        assert (await load(db, job_id)).attempt == 1

        [placed] = (await place(db)).placements
        second = placed.provider_id
        assert second != first and placed.task.attempt == 1
        await lose(db, second, [])  # found by its provider even if the message omits it
        job = await load(db, job_id)
        assert job.status == states.FAILED and job.failure_reason.startswith("provider_lost")
        assert await held_gpus(db) == 0

    async def test_a_cancelled_job_on_a_lost_provider_ends(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await one_placed(db)
        async with db.begin() as session:
            await job_store.request_cancel(session, job_id, None, BILLING)
        await lose(db, provider_id, [job_id])
        job = await load(db, job_id)
        assert job.status == states.CANCELLED and job.finished_at is not None
        assert await held_gpus(db) == 0


class TestDeadlines:
    async def test_a_task_nobody_accepts_goes_elsewhere(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await one_placed(db, machines=2)
        now = datetime.now(UTC)
        assert await lifecycle.expire_unaccepted(db, now, 30, NO_BACKOFF, BILLING) == []
        stopped = await lifecycle.expire_unaccepted(
            db, now + timedelta(seconds=31), 30, NO_BACKOFF, BILLING
        )
        assert [s.provider_id for s in stopped] == [provider_id]
        job = await load(db, job_id)
        assert job.status == states.QUEUED and job.avoid_providers == [provider_id]
        assert "did not accept the task within 30 s" in job.waiting_reason

    async def test_an_accepted_task_is_not_expired(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await one_placed(db)
        await apply(db, event(job_id, provider_id, "accepted"))
        later = datetime.now(UTC) + timedelta(hours=1)
        assert await lifecycle.expire_unaccepted(db, later, 30, NO_BACKOFF, BILLING) == []
        assert (await load(db, job_id)).accepted_at is not None

    async def test_a_run_past_its_time_limit_times_out_and_frees_gpus_when_stopped(
        self, db: async_sessionmaker
    ) -> None:
        job_id, provider_id = await one_placed(db)
        await apply(db, event(job_id, provider_id, "started"))
        now = datetime.now(UTC)
        assert await lifecycle.expire_overdue(db, now, grace_s=30, billing=BILLING) == []
        [stopped] = await lifecycle.expire_overdue(
            db, now + timedelta(seconds=91), grace_s=30, billing=BILLING
        )
        assert stopped.provider_id == provider_id
        job = await load(db, job_id)
        assert job.status == states.TIMED_OUT and job.finished_at is None
        assert job.failure_reason == "max_duration_s exceeded"
        # GPUs stay held until the daemon says the container stopped.
        assert await held_gpus(db) == 1
        async with db() as session:
            later = datetime.now(UTC) + timedelta(seconds=31)
            resend = await lifecycle.unconfirmed_stops(session, later, 30)
        assert [s.job_id for s in resend] == [job_id]
        await apply(db, event(job_id, provider_id, "finished", outcome="cancelled", exit_code=137))
        job = await load(db, job_id)
        assert job.status == states.TIMED_OUT and job.finished_at is not None
        assert await held_gpus(db) == 0


class TestCancel:
    async def test_cancel_in_each_state(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, gpus=2)
            queued = await submit(session, resources={"gpus": 4})
            assigned = await submit(session)
            running = await submit(session)
        await place(db)
        provider_id = (await load(db, running.id)).provider_id
        await apply(db, event(running.id, provider_id, "started"))
        for job in (queued, assigned, running):
            async with db.begin() as session:
                out = await job_store.request_cancel(session, job.id, None, BILLING)
            assert out.status == states.CANCELLED
        assert (await load(db, queued.id)).finished_at is not None
        # The two on the machine wait for the daemon to confirm the stop.
        assert await held_gpus(db) == 2
        for job in (assigned, running):
            assert (await load(db, job.id)).stop_requested_at is not None
            await apply(db, event(job.id, provider_id, "finished", outcome="cancelled"))
        assert await held_gpus(db) == 0
        for job in (queued, assigned, running):
            loaded = await load(db, job.id)
            assert loaded.status == states.CANCELLED and loaded.finished_at is not None
        # Cancelling a finished job changes nothing.
        async with db.begin() as session:
            again = await job_store.request_cancel(session, running.id, None, BILLING)
        assert again.status == states.CANCELLED
