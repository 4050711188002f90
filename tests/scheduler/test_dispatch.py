"""The worker's pass publishes its tasks after the commit, while the next pass runs; a
task that could not be published puts its job back in the queue. JetStream is faked
here (a unit test of the worker's own logic); the database is real."""

import asyncio
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from common import subjects
from common.messages import TaskAssignment
from provider_registry.models import Gpu
from scheduler import states
from scheduler.settings import SchedulerSettings
from scheduler.worker import Scheduler
from tests.provider_registry.factories import create_provider
from tests.scheduler.placing import load, submit


class FakeJetStream:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[tuple[str, bytes]] = []
        self.open = asyncio.Event()
        self.open.set()

    async def publish(self, subject: str, payload: bytes, headers: Any = None) -> None:
        await self.open.wait()
        if self.fail:
            raise ConnectionError("no responders")
        self.sent.append((subject, payload))


def scheduler(db: async_sessionmaker, js: FakeJetStream) -> Scheduler:
    return Scheduler(SchedulerSettings(dev_mode=True), None, js, db)  # type: ignore[arg-type]


async def reserved(db: async_sessionmaker) -> int:
    async with db() as session:
        query = select(func.count()).select_from(Gpu).where(Gpu.reserved_job_id.is_not(None))
        return int(await session.scalar(query) or 0)


async def test_tasks_go_out_after_the_pass(db: async_sessionmaker) -> None:
    async with db.begin() as session:
        provider = await create_provider(session, gpus=2)
        jobs = [await submit(session) for _ in range(2)]
    js = FakeJetStream()
    js.open.clear()
    worker = scheduler(db, js)
    await worker.placement_pass()
    # The pass is over, its jobs assigned, and its publishes still going.
    assert [(await load(db, j.id)).status for j in jobs] == [states.ASSIGNED] * 2
    assert js.sent == []
    js.open.set()
    await worker._published()
    assert sorted(subject for subject, _ in js.sent) == [subjects.tasks_subject(provider.id)] * 2
    tasks = [TaskAssignment.model_validate_json(payload) for _, payload in js.sent]
    assert sorted(t.job_id for t in tasks) == sorted(j.id for j in jobs)


async def test_a_task_not_sent_puts_its_job_back_in_the_queue(db: async_sessionmaker) -> None:
    async with db.begin() as session:
        await create_provider(session, gpus=1)
        job = await submit(session)
    worker = scheduler(db, FakeJetStream(fail=True))
    await worker.placement_pass()
    await worker._published()
    back = await load(db, job.id)
    assert back.status == states.QUEUED and back.provider_id is None
    assert back.waiting_reason == "task could not be sent to the provider; retrying"
    assert await reserved(db) == 0
