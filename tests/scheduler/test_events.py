"""The job state machine on a real PostgreSQL: replays change nothing twice."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from common.messages import JobEvent, OutputFile
from provider_registry.models import Gpu
from scheduler import job_store, metrics, states
from scheduler.events import apply_event
from scheduler.models import JobOutput
from scheduler.retries import RetryPolicy
from tests.provider_registry.factories import create_provider
from tests.scheduler.placing import BILLING, NO_BACKOFF, load, place, submit


async def placed_job(db: async_sessionmaker, retries: int = 2, **kw):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        provider = await create_provider(session, gpus=1)
        job = await submit(session, retries=retries, **kw)
    placed = (await place(db)).placements
    assert [p.provider_id for p in placed] == [provider.id]
    assert placed[0].task.gpu_uuids == [provider.gpus[0].uuid]
    return job.id, provider.id


def event(job_id: str, provider_id: str, type_: str, attempt: int = 0, **kw) -> JobEvent:  # type: ignore[no-untyped-def]
    return JobEvent(
        job_id=job_id,
        attempt=attempt,
        provider_id=provider_id,
        type=type_,
        at=datetime.now(UTC),
        **kw,
    )


async def apply(db: async_sessionmaker, ev: JobEvent):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await apply_event(session, ev, NO_BACKOFF)


async def free_gpus(db: async_sessionmaker) -> int:
    async with db() as session:
        return await session.scalar(
            select(func.count()).select_from(Gpu).where(Gpu.reserved_job_id.is_(None))
        )


class TestApplyEvent:
    async def test_finished_replayed_three_times_changes_nothing_twice(
        self, db: async_sessionmaker
    ) -> None:
        job_id, provider_id = await placed_job(db)
        await apply(db, event(job_id, provider_id, "started"))
        assert (await load(db, job_id)).status == states.RUNNING
        finished = event(
            job_id,
            provider_id,
            "finished",
            exit_code=0,
            outcome="exited",
            outputs=[OutputFile(path="a.txt", size=3, sha256="0" * 64)],
        )
        effects = [await apply(db, finished) for _ in range(3)]
        assert [e.gpus_freed for e in effects] == [True, False, False]
        job = await load(db, job_id)
        assert job.status == states.SUCCEEDED and job.exit_code == 0
        assert await free_gpus(db) == 1
        async with db() as session:
            assert await session.scalar(select(func.count()).select_from(JobOutput)) == 1

    async def test_events_of_another_attempt_or_provider_are_ignored(
        self, db: async_sessionmaker
    ) -> None:
        job_id, provider_id = await placed_job(db)
        await apply(
            db, event(job_id, provider_id, "finished", attempt=5, exit_code=0, outcome="exited")
        )
        await apply(db, event(job_id, str(uuid.uuid4()), "finished", exit_code=0, outcome="exited"))
        assert (await load(db, job_id)).status == states.ASSIGNED
        assert await free_gpus(db) == 0

    async def test_user_failure_is_final(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db)
        await apply(
            db,
            event(job_id, provider_id, "finished", exit_code=2, outcome="exited", log_tail="oops"),
        )
        job = await load(db, job_id)
        assert job.status == states.FAILED and job.exit_code == 2 and job.log_tail == "oops"
        assert job.attempt == 0

    async def test_infrastructure_fault_requeues_elsewhere_then_fails(
        self, db: async_sessionmaker
    ) -> None:
        job_id, provider_id = await placed_job(db, retries=1)
        effect = await apply(
            db,
            event(
                job_id,
                provider_id,
                "finished",
                outcome="infrastructure",
                reason="image pull failed",
            ),
        )
        assert effect.requeued
        job = await load(db, job_id)
        assert job.status == states.QUEUED and job.attempt == 1
        assert job.avoid_providers == [provider_id]
        # The only machine is the one it failed on: it is not chosen again.
        assert (await place(db)).placements == []
        assert "already failed this job" in (await load(db, job_id)).waiting_reason
        async with db.begin() as session:
            other = await create_provider(session, gpus=1)
        [placed] = (await place(db)).placements
        assert placed.task.attempt == 1 and placed.provider_id == other.id
        await apply(
            db,
            event(
                job_id,
                other.id,
                "finished",
                attempt=1,
                outcome="infrastructure",
                reason="disk full",
            ),
        )
        job = await load(db, job_id)
        assert job.status == states.FAILED
        assert job.failure_reason == "infrastructure: disk full"

    async def test_exit_code_the_job_retries_on(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db, retries=1, retry_on_exit_codes=[75])
        await apply(db, event(job_id, provider_id, "finished", exit_code=75, outcome="exited"))
        job = await load(db, job_id)
        assert (job.status, job.attempt, job.avoid_providers) == (states.QUEUED, 1, [])
        assert "exit code 75" in job.waiting_reason
        # Same machine is fine: the user's code asked for it, the machine did nothing wrong.
        [placed] = (await place(db)).placements
        assert placed.provider_id == provider_id
        await apply(
            db, event(job_id, provider_id, "finished", attempt=1, exit_code=75, outcome="exited")
        )
        job = await load(db, job_id)
        assert (job.status, job.exit_code) == (states.FAILED, 75)

    async def test_other_exit_codes_are_not_retried(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db, retry_on_exit_codes=[75])
        await apply(db, event(job_id, provider_id, "finished", exit_code=1, outcome="exited"))
        assert (await load(db, job_id)).status == states.FAILED

    async def test_retry_waits_out_its_backoff(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db)
        async with db.begin() as session:
            await apply_event(
                session,
                event(job_id, provider_id, "rejected", reason="GPU busy"),
                RetryPolicy(backoff_s=30, backoff_max_s=60),
            )
        job = await load(db, job_id)
        assert job.status == states.QUEUED and job.not_before is not None
        assert "retrying in 30 s" in job.waiting_reason
        async with db.begin() as session:
            await create_provider(session, gpus=1)
        assert (await place(db)).placements == []

    async def test_cancel_of_running_job_frees_gpus_when_container_stops(
        self, db: async_sessionmaker
    ) -> None:
        job_id, provider_id = await placed_job(db)
        await apply(db, event(job_id, provider_id, "started"))
        async with db.begin() as session:
            job = await job_store.request_cancel(session, job_id, None, BILLING)
        assert job.status == states.CANCELLED and job.finished_at is None
        assert await free_gpus(db) == 0
        await apply(db, event(job_id, provider_id, "finished", exit_code=137, outcome="cancelled"))
        job = await load(db, job_id)
        assert job.status == states.CANCELLED and job.finished_at is not None
        assert await free_gpus(db) == 1

    async def test_gpus_are_free_once_the_container_exits(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db)
        await apply(db, event(job_id, provider_id, "started"))
        assert await free_gpus(db) == 0
        effect = await apply(db, event(job_id, provider_id, "exited", exit_code=0))
        assert effect.gpus_freed and await free_gpus(db) == 1
        # The job runs on (its results are uploading) until finished, which frees nothing
        # more: the GPU may already be another job's.
        assert (await load(db, job_id)).status == states.RUNNING
        async with db.begin() as session:
            await submit(session)
        [next_job] = (await place(db)).placements
        assert next_job.provider_id == provider_id
        effect = await apply(
            db, event(job_id, provider_id, "finished", exit_code=0, outcome="exited")
        )
        assert not effect.gpus_freed
        assert (await load(db, job_id)).status == states.SUCCEEDED
        assert await free_gpus(db) == 0

    async def test_late_events_do_not_revive_a_cancelled_job(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db)
        async with db.begin() as session:
            await job_store.request_cancel(session, job_id, None, BILLING)
        await apply(db, event(job_id, provider_id, "accepted"))
        await apply(db, event(job_id, provider_id, "started"))
        assert (await load(db, job_id)).status == states.CANCELLED
        await apply(db, event(job_id, provider_id, "finished", exit_code=0, outcome="exited"))
        job = await load(db, job_id)
        assert job.status == states.CANCELLED and job.finished_at is not None
        assert await free_gpus(db) == 1


class TestWhatTheMetricsAreTold:
    async def test_wait_and_run_time(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db)
        started = await apply(db, event(job_id, provider_id, "started"))
        assert started.waited_s is not None and 0 <= started.waited_s < 60
        began = datetime.now(UTC)
        ended = await apply(
            db,
            event(
                job_id,
                provider_id,
                "finished",
                exit_code=0,
                outcome="exited",
                started_at=began,
                ended_at=began + timedelta(seconds=42),
            ),
        )
        assert ended.ran is not None
        state, seconds = ended.ran
        job = await load(db, job_id)
        assert state == states.SUCCEEDED
        expected = began + timedelta(seconds=42) - job.started_at
        assert seconds == pytest.approx(expected.total_seconds())

    async def test_a_cancelled_job_reports_how_long_it_ran(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db)
        await apply(db, event(job_id, provider_id, "started"))
        async with db.begin() as session:
            await job_store.request_cancel(session, job_id, None, BILLING)
        ended = await apply(
            db, event(job_id, provider_id, "finished", exit_code=137, outcome="cancelled")
        )
        assert ended.ran is not None and ended.ran[0] == states.CANCELLED

    async def test_never_started_reports_no_run_time(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db, retries=0)
        ended = await apply(
            db, event(job_id, provider_id, "finished", outcome="infrastructure", reason="pull")
        )
        assert ended.ran is None and not ended.requeued

    async def test_retry_reasons(self, db: async_sessionmaker) -> None:
        job_id, provider_id = await placed_job(db, retries=2, retry_on_exit_codes=[75])
        effect = await apply(
            db, event(job_id, provider_id, "finished", exit_code=75, outcome="exited")
        )
        assert effect.requeued and effect.retry_reason == "exit_code"
        [placed] = (await place(db)).placements
        effect = await apply(
            db, event(job_id, placed.provider_id, "rejected", attempt=1, reason="GPU busy")
        )
        assert effect.requeued and effect.retry_reason == "infrastructure"


async def test_unfinished_jobs_by_state(db: async_sessionmaker) -> None:
    job_id, provider_id = await placed_job(db)
    await apply(db, event(job_id, provider_id, "started"))
    async with db.begin() as session:
        await submit(session, resources={"gpus": 2})
        await submit(session, resources={"gpus": 3})
    async with db() as session:
        await metrics.observe_unfinished(session)
    assert metrics.JOBS.labels(states.QUEUED)._value.get() == 2
    assert metrics.JOBS.labels(states.RUNNING)._value.get() == 1
    assert metrics.JOBS.labels(states.ASSIGNED)._value.get() == 0
    assert metrics.QUEUED_GPUS._value.get() == 5
