"""Group commit of submissions, on the real Postgres and NATS: concurrent requests share
a transaction, yet each gets its own answer, as if they had come one by one."""

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import async_sessionmaker

from billing import funding, reports
from billing.holds import InsufficientFunds
from common import subjects
from common.messages import JobSubmitted
from common.streams import ensure_streams
from gateway.clients import ServiceUnavailable
from gateway.submissions import SubmissionBatcher
from scheduler import job_store
from scheduler.models import Job
from tests.scheduler.placing import BILLING, spec

HOLD = job_store.new_job("someone", spec(), billing=BILLING).hold_amount
assert HOLD is not None


@pytest.fixture
async def nc(nats_server) -> AsyncIterator[NatsClient]:  # type: ignore[no-untyped-def]
    nc = await nats.connect(nats_server.url)
    try:
        yield nc
    finally:
        await nc.drain()


@pytest.fixture
async def js(nc: NatsClient) -> JetStreamContext:
    js = nc.jetstream()
    await ensure_streams(js)
    return js


@pytest.fixture
async def batcher(db: async_sessionmaker, js: JetStreamContext) -> AsyncIterator[SubmissionBatcher]:
    batcher = SubmissionBatcher(db, js, BILLING)
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.stop()


async def funded(db: async_sessionmaker, credits: Decimal) -> str:
    owner = str(uuid.uuid4())
    async with db.begin() as session:
        await funding.add_credits(session, owner, credits, reference=owner)
    return owner


async def test_concurrent_submissions_share_one_commit_in_arrival_order(
    db: async_sessionmaker, nc: NatsClient, batcher: SubmissionBatcher
) -> None:
    owners = [await funded(db, Decimal(100)) for _ in range(3)]
    # Seen on core NATS: a scheduler of another test may be consuming the stream.
    woken: list[str] = []

    async def seen(msg: Msg) -> None:
        woken.append(JobSubmitted.model_validate_json(msg.data).job_id)

    sub = await nc.subscribe(subjects.JOB_SUBMITTED, cb=seen)
    jobs = await asyncio.gather(
        *(batcher.submit(owners[i % 3], spec(priority=i % 2)) for i in range(40))
    )
    assert len({job.id for job in jobs}) == 40
    async with db() as session:
        stored = {j.id: j for j in (await session.scalars(select(Job))).all()}
    assert set(stored) == {job.id for job in jobs}
    # One transaction: its clock plus the position, so FIFO is the order of arrival.
    times = [stored[job.id].created_at for job in jobs]
    assert all(b - a == timedelta(microseconds=1) for a, b in itertools.pairwise(times))
    assert [stored[job.id].owner_id for job in jobs] == [owners[i % 3] for i in range(40)]
    # One wake-up for the batch: the scheduler reads the jobs from Postgres.
    await nc.flush()
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    assert [job_id for job_id in woken if job_id in stored] == [jobs[0].id]
    async with db() as session:
        for owner in owners:
            balance = await reports.balance(session, owner)
            assert balance.held == HOLD * sum(1 for i in range(40) if i % 3 == owners.index(owner))


async def test_a_requester_short_of_credits_is_refused_alone(
    db: async_sessionmaker, batcher: SubmissionBatcher
) -> None:
    poor = await funded(db, HOLD * 3)
    rich = await funded(db, Decimal(100))
    order = [poor, rich, poor, rich, poor, poor, rich, poor]
    answers = await asyncio.gather(
        *(batcher.submit(owner, spec()) for owner in order), return_exceptions=True
    )
    outcomes = [
        (owner, "402" if isinstance(a, InsufficientFunds) else "202")
        for owner, a in zip(order, answers, strict=True)
    ]
    # The first three of the poor requester's fit, in the order they came.
    assert outcomes == [
        (poor, "202"),
        (rich, "202"),
        (poor, "202"),
        (rich, "202"),
        (poor, "202"),
        (poor, "402"),
        (rich, "202"),
        (poor, "402"),
    ]
    refused = [a for a in answers if isinstance(a, InsufficientFunds)]
    assert all((r.required, r.available) == (HOLD, 0) for r in refused)
    async with db() as session:
        owners = (await session.scalars(select(Job.owner_id))).all()
        poor_balance = await reports.balance(session, poor)
    assert sorted(owners) == sorted([poor] * 3 + [rich] * 3)
    assert (poor_balance.available, poor_balance.held) == (0, HOLD * 3)


async def test_a_submission_that_breaks_the_batch_fails_alone(
    db: async_sessionmaker, batcher: SubmissionBatcher
) -> None:
    owner = await funded(db, Decimal(100))
    # Longer than jobs.owner_id allows: Postgres refuses the row, and with it the batch.
    bad_owner = await funded(db, Decimal(100)) + "-too-long-for-the-column"
    answers = await asyncio.gather(
        batcher.submit(owner, spec()),
        batcher.submit(bad_owner, spec()),
        batcher.submit(owner, spec()),
        return_exceptions=True,
    )
    assert isinstance(answers[0], Job) and isinstance(answers[2], Job)
    assert isinstance(answers[1], DBAPIError)
    async with db() as session:
        stored = (await session.scalars(select(Job.id))).all()
    assert sorted(stored) == sorted([answers[0].id, answers[2].id])


async def test_a_stopped_batcher_takes_nothing(
    db: async_sessionmaker, batcher: SubmissionBatcher
) -> None:
    owner = await funded(db, Decimal(100))
    await batcher.stop()
    with pytest.raises(ServiceUnavailable):
        await batcher.submit(owner, spec())


async def test_commits_do_not_wait_for_nats(db: async_sessionmaker) -> None:
    """A wake-up stuck on an unreachable NATS holds back no submission after it."""

    class StuckJetStream:
        published = 0

        async def publish(self, *_: object, **__: object) -> None:
            self.published += 1
            await asyncio.Event().wait()

    js = StuckJetStream()
    batcher = SubmissionBatcher(db, js, BILLING)  # type: ignore[arg-type]
    batcher.start()
    try:
        owner = await funded(db, Decimal(100))
        async with asyncio.timeout(10):
            for _ in range(3):
                await batcher.submit(owner, spec())
        assert js.published == 3
    finally:
        async with asyncio.timeout(10):
            await batcher.stop()
    async with db() as session:
        assert len((await session.scalars(select(Job.id))).all()) == 3


async def test_stopping_answers_the_batch_under_way(
    db: async_sessionmaker, batcher: SubmissionBatcher
) -> None:
    owner = await funded(db, Decimal(100))
    under_way = [asyncio.create_task(batcher.submit(owner, spec())) for _ in range(5)]
    await asyncio.sleep(0.005)  # taken by the batcher, its transaction begun
    async with asyncio.timeout(10):
        await batcher.stop()
        answers = await asyncio.gather(*under_way)
    assert all(isinstance(a, Job) for a in answers)
    with pytest.raises(ServiceUnavailable):
        await batcher.submit(owner, spec())


async def test_arrays_share_the_commit_and_are_refused_whole(
    db: async_sessionmaker, batcher: SubmissionBatcher
) -> None:
    # Enough for the single job and one array of 3, not for a second array of 3.
    owner = await funded(db, HOLD * 5)
    answers = await asyncio.gather(
        batcher.submit_array(owner, [spec(), spec(), spec()]),
        batcher.submit(owner, spec()),
        batcher.submit_array(owner, [spec(), spec(), spec()]),
        return_exceptions=True,
    )
    array, single, refused = answers
    assert isinstance(refused, InsufficientFunds)
    assert (refused.required, refused.available) == (HOLD * 3, HOLD)
    assert isinstance(array, list) and isinstance(single, Job)
    assert [job.array_index for job in array] == [0, 1, 2]
    assert len({job.array_id for job in array}) == 1 and single.array_id is None
    async with db() as session:
        stored = {j.id: j for j in (await session.scalars(select(Job))).all()}
        balance = await reports.balance(session, owner)
    assert set(stored) == {job.id for job in [*array, single]}
    # One transaction, in arrival order: the array's jobs in index order, then the single.
    times = [stored[job.id].created_at for job in [*array, single]]
    assert all(b - a == timedelta(microseconds=1) for a, b in itertools.pairwise(times))
    assert (balance.available, balance.held) == (HOLD, HOLD * 4)


async def test_a_batch_is_cut_by_jobs_but_never_cuts_a_submission(
    db: async_sessionmaker, js: JetStreamContext
) -> None:
    owner = await funded(db, Decimal(100))
    batcher = SubmissionBatcher(db, js, BILLING, max_batch=4)
    batcher.start()
    try:
        sizes = [3, 3, 1, 5, 1]
        created = await asyncio.gather(
            *(batcher.submit_array(owner, [spec()] * size) for size in sizes)
        )
    finally:
        await batcher.stop()
    async with db() as session:
        times = {j.id: j.created_at for j in (await session.scalars(select(Job))).all()}
    # Each transaction has its own clock: the arrays that shared one are 1 µs apart.
    together = [
        times[created[i + 1][0].id] - times[created[i][-1].id] == timedelta(microseconds=1)
        for i in range(len(created) - 1)
    ]
    # 3 | 3+1 | 5 (alone, more than the limit) | 1
    assert together == [False, True, False, False]
