"""Hold, meter, settle and release through the scheduler's own paths, on a real
PostgreSQL: every way a job can end, replays, and the ledger's sums."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from billing import funding, reports
from billing.models import EARNINGS, FEES, PLATFORM, Account, Entry, Transfer, Usage
from billing.schemas import JobCost
from billing.settings import BillingSettings
from billing.settlement import EndedAttempt, FinishedJob, settle
from common.messages import JobEvent, ProviderLost
from provider_registry.models import Provider
from scheduler import job_store, lifecycle, states
from scheduler.events import apply_events
from tests.provider_registry.factories import create_provider
from tests.scheduler.placing import BILLING, NO_BACKOFF, load, place, spec

T0 = datetime.now(UTC).replace(microsecond=0)
PRICE = Decimal("0.50")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(autouse=True)
def _timeline() -> None:
    """Each test's times count from its own start: the platform stamps assignments with
    its clock, and a lost provider's `at` must come after them however late a test runs."""
    global T0
    T0 = datetime.now(UTC).replace(microsecond=0)


async def funded(db: async_sessionmaker, credits: str = "100") -> str:
    owner = str(uuid.uuid4())
    async with db.begin() as session:
        await funding.add_credits(session, owner, Decimal(credits), reference=owner)
    return owner


async def deliver(db: async_sessionmaker, *events: tuple[JobEvent, datetime]) -> None:
    """As the scheduler's events consumer does: one transaction, settled within."""
    async with db.begin() as session:
        await apply_events(session, list(events), NO_BACKOFF, BILLING)


def event(job_id: str, provider_id: str, type_: str, attempt: int = 0, **kw) -> JobEvent:  # type: ignore[no-untyped-def]
    return JobEvent(
        job_id=job_id, attempt=attempt, provider_id=provider_id, type=type_, at=at(0), **kw
    )


def finished(job_id: str, provider_id: str, seconds: float, attempt: int = 0, **kw) -> JobEvent:  # type: ignore[no-untyped-def]
    """The daemon's `finished` for a container that ran `seconds` from T0."""
    kw.setdefault("outcome", "exited")
    kw.setdefault("exit_code", 0 if kw["outcome"] == "exited" else None)
    return event(
        job_id, provider_id, "finished", attempt, started_at=at(0), ended_at=at(seconds), **kw
    )


async def running(db: async_sessionmaker, owner: str, **kw) -> tuple[str, Provider]:  # type: ignore[no-untyped-def]
    """A job of `owner` placed on a fresh one-GPU machine at PRICE, its container started."""
    kw.setdefault("max_duration_s", 3600)
    async with db.begin() as session:
        provider = await create_provider(session, gpus=1, price=str(PRICE))
        job = await job_store.create_job(session, owner, spec(**kw), BILLING)
    [placed] = (await place(db)).placements
    assert placed.provider_id == provider.id
    await deliver(db, (event(job.id, provider.id, "started"), at(0.2)))
    return job.id, provider


async def money(db: async_sessionmaker, owner: str) -> tuple[Decimal, Decimal]:
    async with db() as session:
        b = await reports.balance(session, owner)
    return b.available, b.held


async def cost(db: async_sessionmaker, job_id: str) -> JobCost:
    job = await load(db, job_id)
    async with db() as session:
        costs = await reports.job_costs(
            session, [reports.JobMoney(job.id, job.hold_amount, job.settled_at is not None)]
        )
    return costs[job_id]


async def earnings_of(db: async_sessionmaker, owner_id: str) -> Decimal:
    async with db() as session:
        return (await reports.earnings(session, owner_id)).earned


async def assert_ledger_consistent(db: async_sessionmaker) -> None:
    async with db() as session:
        assert await session.scalar(select(func.coalesce(func.sum(Entry.amount), 0))) == 0
        unbalanced = await session.execute(
            select(Entry.transfer_id)
            .group_by(Entry.transfer_id)
            .having((func.sum(Entry.amount) != 0) | (func.count() != 2))
        )
        assert unbalanced.all() == []
        sums = dict(
            (
                await session.execute(
                    select(Entry.account_id, func.sum(Entry.amount)).group_by(Entry.account_id)
                )
            ).all()
        )
        for account in (await session.scalars(select(Account))).all():
            assert account.balance == sums.get(account.id, 0), account.kind


class TestSettlement:
    async def test_success_charges_the_time_run_pays_the_provider_and_releases_the_rest(
        self, db: async_sessionmaker
    ) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner)
        # No max price: held at the default ceiling, 5.00/GPU-hour for the hour it may run.
        assert await money(db, owner) == (Decimal(95), Decimal(5))

        await deliver(db, (finished(job_id, provider.id, 360), at(362)))

        job = await load(db, job_id)
        assert job.status == states.SUCCEEDED and job.gpu_model == "RTX 4090"
        # 360 s x 1 GPU x 0.50/h = 0.05; the platform keeps 10%.
        assert await cost(db, job_id) == JobCost(
            held=Decimal(5),
            charged=Decimal("0.05"),
            released=Decimal("4.95"),
            billed_seconds=360,
            settled=True,
        )
        assert await money(db, owner) == (Decimal("99.95"), Decimal(0))
        assert await earnings_of(db, provider.owner_id) == Decimal("0.045")
        async with db() as session:
            fees = await session.scalar(
                select(Account.balance).where(Account.kind == FEES, Account.owner_id == PLATFORM)
            )
            usage = await session.scalar(select(Usage).where(Usage.job_id == job_id))
        assert fees == Decimal("0.005")
        assert (usage.clock, usage.billed_seconds, usage.chargeable) == ("provider", 360, True)
        await assert_ledger_consistent(db)

    async def test_a_users_failure_is_charged(self, db: async_sessionmaker) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner)
        await deliver(db, (finished(job_id, provider.id, 720, exit_code=1), at(721)))
        assert (await load(db, job_id)).status == states.FAILED
        assert (await cost(db, job_id)).charged == Decimal("0.1")
        assert await money(db, owner) == (Decimal("99.9"), Decimal(0))

    async def test_a_timeout_is_charged_up_to_the_time_limit(self, db: async_sessionmaker) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner, max_duration_s=600)
        # The daemon stopped it a little late (grace period): billed up to the limit.
        await deliver(db, (finished(job_id, provider.id, 612, outcome="timed_out"), at(613)))
        assert (await load(db, job_id)).status == states.TIMED_OUT
        job_cost = await cost(db, job_id)
        assert (job_cost.billed_seconds, job_cost.charged) == (600, Decimal("0.083333"))

    async def test_a_cancelled_run_is_charged_until_its_container_stopped(
        self, db: async_sessionmaker
    ) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner)
        async with db.begin() as session:
            await job_store.request_cancel(session, job_id, owner, BILLING)
        # Nothing is settled until the daemon says the container stopped.
        assert not (await cost(db, job_id)).settled
        await deliver(db, (finished(job_id, provider.id, 90, outcome="cancelled"), at(91)))
        job_cost = await cost(db, job_id)
        assert (job_cost.billed_seconds, job_cost.charged, job_cost.settled) == (
            90,
            Decimal("0.0125"),
            True,
        )
        assert (await load(db, job_id)).status == states.CANCELLED

    async def test_a_queued_cancel_costs_nothing(self, db: async_sessionmaker) -> None:
        owner = await funded(db)
        async with db.begin() as session:
            job = await job_store.create_job(session, owner, spec(max_duration_s=3600), BILLING)
        assert await money(db, owner) == (Decimal(95), Decimal(5))
        async with db.begin() as session:
            await job_store.request_cancel(session, job.id, owner, BILLING)
        assert await money(db, owner) == (Decimal(100), Decimal(0))
        assert (await cost(db, job.id)).released == Decimal(5)

    async def test_an_infrastructure_failure_costs_nothing(self, db: async_sessionmaker) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner, retries=0)
        await deliver(
            db,
            (
                finished(job_id, provider.id, 300, outcome="infrastructure", reason="disk full"),
                at(301),
            ),
        )
        assert (await load(db, job_id)).status == states.FAILED
        assert (await cost(db, job_id)).charged == 0
        assert await money(db, owner) == (Decimal(100), Decimal(0))
        assert await earnings_of(db, provider.owner_id) == 0
        async with db() as session:
            usage = await session.scalar(select(Usage).where(Usage.job_id == job_id))
        assert (usage.chargeable, usage.cost, usage.clock) == (False, 0, "none")

    async def test_only_the_attempt_that_ran_is_charged_after_a_retry(
        self, db: async_sessionmaker
    ) -> None:
        owner = await funded(db)
        job_id, first = await running(db, owner, retries=1)
        await deliver(db, (finished(job_id, first.id, 300, outcome="infrastructure"), at(301)))
        job = await load(db, job_id)
        assert (job.status, job.attempt) == (states.QUEUED, 1)
        async with db.begin() as session:
            second = await create_provider(session, gpus=1, price="0.50")
        [placed] = (await place(db)).placements
        assert placed.provider_id == second.id
        await deliver(db, (event(job_id, second.id, "started", attempt=1), at(400)))
        await deliver(db, (finished(job_id, second.id, 180, attempt=1), at(581)))
        assert (await cost(db, job_id)).charged == Decimal("0.025")
        assert await earnings_of(db, first.owner_id) == 0
        assert await earnings_of(db, second.owner_id) == Decimal("0.0225")

    async def test_a_lost_provider_costs_nothing(self, db: async_sessionmaker) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner, retries=0)
        lost = ProviderLost(provider_id=provider.id, at=at(100), last_heartbeat_at=at(60))
        async with db.begin() as session:
            await lifecycle.on_provider_lost(session, lost, NO_BACKOFF, BILLING)
        job = await load(db, job_id)
        assert job.status == states.FAILED and job.failure_reason.startswith("provider_lost")
        assert await money(db, owner) == (Decimal(100), Decimal(0))

    async def test_retried_exit_codes_are_held_and_charged_per_attempt(
        self, db: async_sessionmaker
    ) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner, retries=2, retry_on_exit_codes=[3])
        # Every attempt can be the user's to pay: three hours held.
        assert await money(db, owner) == (Decimal(85), Decimal(15))
        await deliver(db, (finished(job_id, provider.id, 360, exit_code=3), at(361)))
        [placed] = (await place(db)).placements
        await deliver(db, (event(job_id, placed.provider_id, "started", attempt=1), at(400)))
        await deliver(db, (finished(job_id, placed.provider_id, 360, attempt=1), at(761)))
        job_cost = await cost(db, job_id)
        assert (job_cost.charged, job_cost.billed_seconds) == (Decimal("0.1"), 720)
        assert await money(db, owner) == (Decimal("99.9"), Decimal(0))

    async def test_the_platforms_clock_wins_over_an_inflated_claim(
        self, db: async_sessionmaker
    ) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner)
        # Claims an hour; the platform saw `started` at 0.2 s and `finished` at 120.2 s.
        await deliver(db, (finished(job_id, provider.id, 3600), at(120.2)))
        async with db() as session:
            usage = await session.scalar(select(Usage).where(Usage.job_id == job_id))
        assert (usage.clock, usage.billed_seconds) == ("platform", 120)

    async def test_a_finish_replayed_three_times_charges_once(self, db: async_sessionmaker) -> None:
        owner = await funded(db)
        job_id, provider = await running(db, owner)
        done = finished(job_id, provider.id, 360)
        for _ in range(3):
            await deliver(db, (done, at(361)))
        # Replayed below the scheduler too: settlement itself is idempotent.
        job = await load(db, job_id)
        attempt = EndedAttempt(
            job_id=job_id,
            attempt=0,
            owner_id=owner,
            provider_id=provider.id,
            gpu_model=job.gpu_model,
            gpus=1,
            price_per_gpu_hour=PRICE,
            max_duration_s=3600,
            started_at=at(0),
            ended_at=at(360),
            started_seen_at=at(0.2),
            ended_seen_at=at(361),
            chargeable=True,
        )
        for _ in range(3):
            async with db.begin() as session:
                assert await settle(session, BILLING, [attempt], [FinishedJob(job_id, owner)]) == []
        assert (await cost(db, job_id)).charged == Decimal("0.05")
        assert await money(db, owner) == (Decimal("99.95"), Decimal(0))
        async with db() as session:
            assert await session.scalar(select(func.count()).select_from(Transfer)) == 5
        await assert_ledger_consistent(db)

    async def test_a_missed_settlement_is_made_by_the_sweep(self, db: async_sessionmaker) -> None:
        owner = await funded(db)
        async with db.begin() as session:
            job = await job_store.create_job(session, owner, spec(max_duration_s=3600), BILLING)
            # Ended by a path that did not settle it.
            job.status, job.finished_at = states.FAILED, func.now()
        assert await money(db, owner) == (Decimal(95), Decimal(5))
        from scheduler.settling import settle_stragglers

        assert await settle_stragglers(db, BILLING, datetime.now(UTC) + timedelta(seconds=1)) == 1
        assert await money(db, owner) == (Decimal(100), Decimal(0))
        assert await settle_stragglers(db, BILLING, datetime.now(UTC) + timedelta(seconds=1)) == 0


async def test_a_thousand_concurrent_settlements_keep_the_ledger_exact(
    db: async_sessionmaker,
) -> None:
    """1,000 attempts of 50 requesters on 20 machines of 4 owners, settled at once from
    many connections: the ledger sums to zero, every balance equals its entries, and every
    requester paid exactly what its attempts cost."""
    settings = BillingSettings(dev_mode=True, platform_fee_rate=Decimal("0.15"))
    requesters = [await funded(db, "1000") for _ in range(50)]
    owners = [str(uuid.uuid4()) for _ in range(4)]
    async with db.begin() as session:
        machines = [await create_provider(session, gpus=1) for _ in range(20)]
        for i, machine in enumerate(machines):
            machine.owner_id = owners[i % 4]
    jobs = []
    async with db.begin() as session:
        for i in range(1000):
            owner = requesters[i % 50]
            job = await job_store.create_job(
                session, owner, spec(max_duration_s=3600, resources={"gpus": 1 + i % 3}), settings
            )
            jobs.append(job)
    expected: dict[str, Decimal] = {r: Decimal(0) for r in requesters}
    attempts = []
    for i, job in enumerate(jobs):
        seconds = 1 + (i * 37) % 3000
        price = Decimal("0.10") * (1 + i % 7)
        attempts.append(
            EndedAttempt(
                job_id=job.id,
                attempt=0,
                owner_id=job.owner_id,
                provider_id=machines[i % 20].id,
                gpu_model="RTX 4090",
                gpus=job.gpus,
                price_per_gpu_hour=price,
                max_duration_s=3600,
                started_at=at(0),
                ended_at=at(seconds),
                started_seen_at=at(0),
                ended_seen_at=at(seconds + 1),
                chargeable=i % 10 != 0,  # every tenth an infrastructure fault
            )
        )
        if i % 10:
            expected[job.owner_id] += (job.gpus * price * seconds / Decimal(3600)).quantize(
                Decimal("0.000001")
            )

    async def settle_one(attempt: EndedAttempt) -> None:
        for _ in range(5):  # a serialization failure is retried, like a redelivery
            try:
                async with db.begin() as session:
                    await settle(
                        session,
                        settings,
                        [attempt],
                        [FinishedJob(attempt.job_id, attempt.owner_id)],
                    )
                return
            except Exception:
                await asyncio.sleep(0.05)
        raise AssertionError(f"settlement of {attempt.job_id} kept failing")

    # Each attempt is also settled a second time, concurrently with the first.
    await asyncio.gather(*(settle_one(a) for a in attempts + attempts[::3]))

    await assert_ledger_consistent(db)
    for requester in requesters:
        assert await money(db, requester) == (Decimal(1000) - expected[requester], Decimal(0))
    async with db() as session:
        totals = await reports.totals(session)
        earned = await session.scalar(
            select(func.sum(Account.balance)).where(Account.kind == EARNINGS)
        )
    revenue = sum(expected.values(), Decimal(0))
    assert totals.ledger_balanced
    assert totals.revenue == revenue
    assert earned + totals.platform_fees == revenue
    assert totals.credits_issued == Decimal(50_000)
    assert totals.requester_held == 0
