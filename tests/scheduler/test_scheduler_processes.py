"""Three real scheduler processes on one durable consumer, real NATS and PostgreSQL.

A simulated fleet answers tasks over the real NATS protocol and watches every GPU: a
task naming a GPU that another unfinished task holds is a double booking. One scheduler
is killed with SIGKILL in the middle of the burst; every job must still run, once.
"""

import asyncio
import json
import os
import random
import secrets
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import nats
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from common import subjects
from common.messages import JobEvent, JobSubmitted, ProviderLost, TaskAssignment
from common.streams import ensure_streams
from gpumarket.localstack.nats import NatsServer, start_nats
from gpumarket.localstack.process import free_port, log_tail, spawn, stop_process
from provider_registry.models import OFFLINE, Gpu, Provider
from scheduler import job_store, states
from scheduler.models import Job
from tests.provider_registry.factories import create_provider
from tests.scheduler.placing import BILLING, spec

JOBS = 1500
MACHINES = 25
GPUS_PER_MACHINE = 4


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    # Its own server: durable consumers and streams start empty.
    server = start_nats(tmp_path / "nats")
    yield server
    server.stop()


class SimulatedFleet:
    """Accepts every task at once and runs it for a few ms, then reports it finished.

    A task whose command is ["hang"] runs until cancelled. Machines in `stuck` accept
    and start tasks but never answer again, like a machine that lost its network.
    """

    def __init__(self, nats_url: str, stuck: frozenset[str] = frozenset()) -> None:
        self.nats_url = nats_url
        self.stuck = stuck
        self.holders: dict[str, tuple[str, int]] = {}
        self.double_bookings: list[str] = []
        self.runs: Counter[str] = Counter()
        self.hanging: dict[tuple[str, int], asyncio.Event] = {}

    async def run(self, stop: asyncio.Event) -> None:
        nc = await nats.connect(self.nats_url)
        js = nc.jetstream()
        sub = await js.pull_subscribe("tasks.>", durable="fleet", stream=subjects.TASKS_STREAM)
        async with asyncio.TaskGroup() as tg:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(batch=100, timeout=0.5)
                except TimeoutError:
                    continue
                for msg in msgs:
                    provider_id = msg.subject.split(".", 1)[1]
                    await msg.ack()
                    body = json.loads(msg.data)
                    if body["kind"] == "run":
                        task = TaskAssignment.model_validate_json(msg.data)
                        tg.create_task(self._run(js, provider_id, task))
                    elif provider_id not in self.stuck:
                        key = (body["job_id"], body["attempt"])
                        self.hanging.setdefault(key, asyncio.Event()).set()
            for cancelled in self.hanging.values():
                cancelled.set()
        await nc.drain()

    async def _run(self, js, provider_id: str, task: TaskAssignment) -> None:  # type: ignore[no-untyped-def]
        key = (task.job_id, task.attempt)
        for uuid in task.gpu_uuids:
            if uuid in self.holders:
                self.double_bookings.append(f"{uuid}: {self.holders[uuid]} and {key}")
            self.holders[uuid] = key
        self.runs[task.job_id] += 1
        await self._event(js, provider_id, task, "accepted")
        await self._event(js, provider_id, task, "started")
        if provider_id in self.stuck:
            return
        outcome = "exited"
        if task.command == ["hang"]:
            await self.hanging.setdefault(key, asyncio.Event()).wait()
            outcome = "cancelled"
        else:
            await asyncio.sleep(random.uniform(0.005, 0.05))
        for uuid in task.gpu_uuids:
            if self.holders.get(uuid) == key:
                del self.holders[uuid]
        await self._event(js, provider_id, task, "finished", outcome=outcome, exit_code=0)

    async def _event(self, js, provider_id: str, task: TaskAssignment, type_: str, **kw) -> None:  # type: ignore[no-untyped-def]
        event = JobEvent(
            job_id=task.job_id,
            attempt=task.attempt,
            provider_id=provider_id,
            type=type_,  # type: ignore[arg-type]
            at=datetime.now(UTC),
            **kw,
        )
        await js.publish(
            subjects.event_subject(provider_id, task.job_id),
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": subjects.msg_id(task.job_id, task.attempt, type_)},
        )


def start_scheduler(name: str, database_url: str, nats_url: str, log_dir: Path, **settings):  # type: ignore[no-untyped-def]
    port = free_port()
    env = {
        **os.environ,
        "GPUMARKET_DATABASE_URL": database_url,
        "GPUMARKET_NATS_URL": nats_url,
        "GPUMARKET_HTTP_PORT": str(port),
        "GPUMARKET_INTERNAL_TOKEN": secrets.token_urlsafe(16),
        "GPUMARKET_PLACEMENT_INTERVAL_S": "0.5",
        "GPUMARKET_PLACEMENT_BATCH": "50",
        "GPUMARKET_LIFECYCLE_INTERVAL_S": "1",
        # Tasks lost with the killed scheduler come back after this.
        "GPUMARKET_ACCEPT_TIMEOUT_S": "5",
        "GPUMARKET_RETRY_BACKOFF_S": "0.1",
        **{f"GPUMARKET_{key.upper()}": str(value) for key, value in settings.items()},
    }
    proc = spawn(name, [sys.executable, "-m", "scheduler.worker"], log_dir / f"{name}.log", env=env)
    return proc, port


async def _healthy(http: httpx.AsyncClient, port: int) -> bool:
    try:
        return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    except httpx.TransportError:
        return False  # not listening yet


@pytest.fixture
async def scheduler_pool(
    own_nats: NatsServer, unit_database_url: str, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[list]]]:
    """Starts scheduler processes on this test's NATS and database, healthy or failed."""
    started: list = []

    async def start(count: int, **settings) -> list:  # type: ignore[no-untyped-def]
        names = [f"scheduler-{len(started) + n}" for n in range(count)]
        procs = [
            start_scheduler(name, unit_database_url, own_nats.url, tmp_path, **settings)
            for name in names
        ]
        started.extend(p for p, _ in procs)
        async with httpx.AsyncClient() as http:
            for name, (proc, port) in zip(names, procs, strict=True):
                for _ in range(200):
                    assert proc.poll() is None, log_tail(tmp_path / f"{name}.log")
                    if await _healthy(http, port):
                        break
                    await asyncio.sleep(0.1)
        return [p for p, _ in procs]

    yield start
    for proc in started:
        stop_process(proc)


async def count(db: async_sessionmaker, *where) -> int:  # type: ignore[no-untyped-def]
    async with db() as session:
        return await session.scalar(select(func.count()).select_from(Job).where(*where)) or 0


async def test_three_schedulers_one_killed_mid_burst(
    db: async_sessionmaker, own_nats: NatsServer, scheduler_pool
) -> None:
    schedulers = await scheduler_pool(3)
    async with db.begin() as session:
        for _ in range(MACHINES):
            await create_provider(session, gpus=GPUS_PER_MACHINE)
    fleet = SimulatedFleet(own_nats.url)
    stop = asyncio.Event()
    fleet_task = asyncio.create_task(fleet.run(stop))
    nc = await nats.connect(own_nats.url)
    js = nc.jetstream()
    await ensure_streams(js)
    try:
        for start in range(0, JOBS, 500):
            async with db.begin() as session:
                jobs = [job_store.new_job(f"owner-{i % 3}", spec()) for i in range(500)]
                session.add_all(jobs)
            for job in jobs:
                await js.publish(
                    subjects.JOB_SUBMITTED, JobSubmitted(job_id=job.id).model_dump_json().encode()
                )
            if start == 0:
                # Mid-burst: some jobs placed, some not, some tasks in flight.
                for _ in range(300):
                    if await count(db, Job.assigned_at.is_not(None)) >= 100:
                        break
                    await asyncio.sleep(0.05)
                schedulers[0].send_signal(signal.SIGKILL)
        for _ in range(1200):
            if await count(db, Job.status == states.SUCCEEDED) == JOBS:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await fleet_task
        await nc.drain()

    assert fleet.double_bookings == []
    async with db() as session:
        by_status = dict(
            (await session.execute(select(Job.status, func.count()).group_by(Job.status))).all()
        )
        held = await session.scalar(
            select(func.count()).select_from(Gpu).where(Gpu.reserved_job_id.is_not(None))
        )
    assert by_status == {states.SUCCEEDED: JOBS}
    assert held == 0
    assert len(fleet.runs) == JOBS
    assert schedulers[0].poll() is not None
    assert all(p.poll() is None for p in schedulers[1:])


async def wait_for_job(db: async_sessionmaker, job_id: str, check, what: str) -> Job:  # type: ignore[no-untyped-def]
    for _ in range(300):
        async with db() as session:
            job = await job_store.get_job(session, job_id)
        if check(job):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: job is {job.status}, attempt {job.attempt}")


async def test_lost_provider_time_limit_and_cancel_through_the_process(
    db: async_sessionmaker, own_nats: NatsServer, scheduler_pool
) -> None:
    async with db.begin() as session:
        lost = await create_provider(session, gpus=1, price="0.10")
        good = await create_provider(session, gpus=2, price="0.90")
    await scheduler_pool(
        1, lifecycle_interval_s=0.3, overdue_grace_s=1, stop_resend_s=1, placement_interval_s=0.3
    )
    fleet = SimulatedFleet(own_nats.url, stuck=frozenset({lost.id}))
    stop = asyncio.Event()
    fleet_task = asyncio.create_task(fleet.run(stop))
    nc = await nats.connect(own_nats.url)
    js = nc.jetstream()
    try:
        async with db.begin() as session:
            moved = await job_store.create_job(session, "owner", spec(retries=1))
        first = await wait_for_job(db, moved.id, lambda j: j.status == states.RUNNING, "running")
        assert first.provider_id == lost.id
        # The registry declares the machine lost: the job runs again elsewhere.
        async with db.begin() as session:
            await session.execute(
                update(Provider).where(Provider.id == lost.id).values(state=OFFLINE)
            )
        await js.publish(
            subjects.provider_lost_subject(lost.id),
            ProviderLost(
                provider_id=lost.id,
                at=datetime.now(UTC),
                last_heartbeat_at=None,
                job_ids=[moved.id],
            )
            .model_dump_json()
            .encode(),
        )
        done = await wait_for_job(db, moved.id, lambda j: j.finished_at is not None, "rerun")
        assert (done.status, done.attempt, done.provider_id) == (states.SUCCEEDED, 1, good.id)

        # A run past its time limit by the platform's clock: timed out, then stopped.
        async with db.begin() as session:
            slow = await job_store.create_job(
                session, "owner", spec(command=["hang"], max_duration_s=1)
            )
            hung = await job_store.create_job(session, "owner", spec(command=["hang"]))
        await wait_for_job(db, hung.id, lambda j: j.status == states.RUNNING, "hung runs")
        timed_out = await wait_for_job(db, slow.id, lambda j: j.finished_at is not None, "stop")
        assert timed_out.status == states.TIMED_OUT
        # A cancel whose message never went out (as if the gateway crashed right after the
        # commit) still reaches the daemon: the scheduler asks again.
        async with db.begin() as session:
            await job_store.request_cancel(session, hung.id, None, BILLING)
        cancelled = await wait_for_job(db, hung.id, lambda j: j.finished_at is not None, "cancel")
        assert cancelled.status == states.CANCELLED
    finally:
        stop.set()
        await fleet_task
        await nc.drain()
    async with db() as session:
        held = await session.scalar(
            select(func.count()).select_from(Gpu).where(Gpu.reserved_job_id.is_not(None))
        )
    assert held == 0
    assert fleet.double_bookings == []
