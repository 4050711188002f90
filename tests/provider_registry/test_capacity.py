"""GPU reservations on a real PostgreSQL: one owner per GPU, whatever the concurrency."""

import asyncio
import uuid
from decimal import Decimal

from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker

from provider_registry import capacity, offers, service
from provider_registry.models import OFFLINE, Gpu, Provider
from provider_registry.offers import OfferQuery
from tests.provider_registry.factories import create_provider, reserve_any


async def reserve(
    db: async_sessionmaker, count: int = 1, model: str | None = None, job_id: str | None = None
):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await reserve_any(session, job_id or str(uuid.uuid4()), count, model)


async def reserve_on(db: async_sessionmaker, machine: Provider, count: int = 1, **kw):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await capacity.reserve_in_pool(
            session, str(uuid.uuid4()), machine.id, machine.gpus[0].model, count, **kw
        )


async def reserve_on_for(db: async_sessionmaker, machine: Provider, job_id: str, count: int):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await capacity.reserve_in_pool(
            session, job_id, machine.id, machine.gpus[0].model, count
        )


class TestReserveInPool:
    async def test_reserves_exact_gpus_in_index_order(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            machine = await create_provider(session, gpus=4, price="2.00")
        two = await reserve_on(db, machine, 2)
        assert two.provider_id == machine.id
        assert two.gpu_uuids == [machine.gpus[0].uuid, machine.gpus[1].uuid]
        assert two.price_per_gpu_hour == Decimal("2.00")
        assert (await reserve_on(db, machine, 2)).gpu_uuids == [
            machine.gpus[2].uuid,
            machine.gpus[3].uuid,
        ]
        assert await reserve_on(db, machine, 1) is None

    async def test_a_partial_fit_holds_nothing(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            machine = await create_provider(session, gpus=2)
        assert await reserve_on(db, machine, 3) is None
        assert await reserve_on(db, machine, 2) is not None

    async def test_the_truth_overrides_a_stale_choice(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            offline = await create_provider(session, gpus=1, state=OFFLINE)
            dear = await create_provider(session, gpus=1, price="3.00")
            sick = await create_provider(session, gpus=1)
            await session.execute(
                update(Gpu).where(Gpu.provider_id == sick.id).values(healthy=False)
            )
        assert await reserve_on(db, offline) is None
        assert await reserve_on(db, sick) is None
        assert await reserve_on(db, dear, max_price_per_hour=Decimal("2.99")) is None
        assert await reserve_on(db, dear, max_price_per_hour=Decimal("3.00")) is not None

    async def test_concurrent_reservations_never_share_a_gpu(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            machine = await create_provider(session, gpus=8)
        results = await asyncio.gather(*[reserve_on(db, machine) for _ in range(20)])
        won = [r for r in results if r is not None]
        uuids = [u for r in won for u in r.gpu_uuids]
        assert len(uuids) == len(set(uuids))
        # SKIP LOCKED: a racer that finds GPUs locked takes others or none, never waits;
        # what one pass misses the next one gets, and never more than the machine has.
        rest = [await reserve_on(db, machine) for _ in range(8)]
        assert len(won) + sum(r is not None for r in rest) == 8

    async def test_release_frees_and_is_idempotent(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, gpus=1)
        job_id = str(uuid.uuid4())
        assert await reserve(db, job_id=job_id)
        assert await reserve(db) is None
        async with db.begin() as session:
            assert await capacity.release(session, job_id) == 1
            assert await capacity.release(session, job_id) == 0
        assert await reserve(db)

    async def test_release_many_says_how_many_each_job_held(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            machine = await create_provider(session, gpus=4)
        two, one, none = (str(uuid.uuid4()) for _ in range(3))
        assert await reserve_on_for(db, machine, two, 2)
        assert await reserve_on_for(db, machine, one, 1)
        async with db.begin() as session:
            assert await capacity.release_many(session, [two, one, none]) == {two: 2, one: 1}
            assert await capacity.release_many(session, [two, one, none]) == {}
            assert await capacity.release_many(session, []) == {}
        assert await reserve_on(db, machine, 4)


class TestSuspension:
    async def test_suspended_machines_take_no_work_until_their_owner_is_back(
        self, db: async_sessionmaker
    ) -> None:
        async with db.begin() as session:
            machine = await create_provider(session, gpus=1, model="A10")
            revoked = await create_provider(session, gpus=1, model="A10")
            revoked.owner_id = machine.owner_id
        async with db.begin() as session:
            await service.suspend_revoked(session, revoked.id)
            assert await service.suspend_owner(session, machine.owner_id) == 1
        assert await reserve(db, model="A10") is None
        async with db.begin() as session:
            page = await offers.search_offers(session, OfferQuery(models=["A10"]))
            assert page.offers == [] and page.total == 0
            # Re-enabling the owner brings back what disabling took, not a revoked machine.
            assert await service.resume_owner(session, machine.owner_id) == 1
        assert (await reserve(db, model="A10")).provider_id == machine.id
        assert await reserve(db, model="A10") is None
