"""GPU reservations on a real PostgreSQL: one owner per GPU, whatever the concurrency."""

import asyncio
import uuid
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from provider_registry import capacity, offers, service
from provider_registry.models import OFFLINE, Gpu, Provider
from provider_registry.offers import OfferQuery
from tests.provider_registry.factories import create_provider, reserve_any, reserve_in_pool


async def reserve(
    db: async_sessionmaker, count: int = 1, model: str | None = None, job_id: str | None = None
):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await reserve_any(session, job_id or str(uuid.uuid4()), count, model)


async def reserve_on(db: async_sessionmaker, machine: Provider, count: int = 1, **kw):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await reserve_in_pool(
            session, str(uuid.uuid4()), machine.id, machine.gpus[0].model, count, **kw
        )


async def reserve_on_for(db: async_sessionmaker, machine: Provider, job_id: str, count: int):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await reserve_in_pool(session, job_id, machine.id, machine.gpus[0].model, count)


class TestRelease:
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


def wanted(machine: Provider, indexes: list[int], **kw) -> capacity.Wanted:  # type: ignore[no-untyped-def]
    return capacity.Wanted(
        job_id=kw.pop("job_id", None) or str(uuid.uuid4()),
        provider_id=machine.id,
        model=machine.gpus[0].model,
        gpu_uuids=[machine.gpus[i].uuid for i in indexes],
        **kw,
    )


async def reserve_exact(db: async_sessionmaker, *asked: capacity.Wanted):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await capacity.reserve_exact(session, list(asked))


async def holders(db: async_sessionmaker, machine: Provider) -> list[str | None]:
    async with db() as session:
        rows = await session.execute(
            select(Gpu.reserved_job_id).where(Gpu.provider_id == machine.id).order_by(Gpu.index)
        )
        return list(rows.scalars())


class TestReserveExact:
    async def test_many_jobs_get_their_named_gpus_in_one_go(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            a = await create_provider(session, gpus=4, price="2.00")
            b = await create_provider(session, gpus=2, price="1.50")
        first, second, third = wanted(a, [3, 1]), wanted(a, [0]), wanted(b, [0, 1])
        got = await reserve_exact(db, first, second, third)
        assert got == {
            first.job_id: capacity.Reservation(
                a.id, [a.gpus[1].uuid, a.gpus[3].uuid], Decimal("2.00"), a.gpus[0].model
            ),
            second.job_id: capacity.Reservation(
                a.id, [a.gpus[0].uuid], Decimal("2.00"), a.gpus[0].model
            ),
            third.job_id: capacity.Reservation(
                b.id, [b.gpus[0].uuid, b.gpus[1].uuid], Decimal("1.50"), b.gpus[0].model
            ),
        }
        assert await holders(db, a) == [second.job_id, first.job_id, None, first.job_id]
        assert await reserve_exact(db) == {}

    async def test_a_job_short_of_one_gpu_holds_none_and_others_are_unharmed(
        self, db: async_sessionmaker
    ) -> None:
        async with db.begin() as session:
            machine = await create_provider(session, gpus=4)
        taken = await reserve_exact(db, wanted(machine, [1]))
        [holder] = taken
        late, fine = wanted(machine, [0, 1]), wanted(machine, [2, 3])
        got = await reserve_exact(db, late, fine)
        assert set(got) == {fine.job_id}
        assert await holders(db, machine) == [None, holder, fine.job_id, fine.job_id]

    async def test_the_truth_overrides_a_stale_choice(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            offline = await create_provider(session, gpus=1, state=OFFLINE)
            dear = await create_provider(session, gpus=1, price="3.00")
            sick = await create_provider(session, gpus=2)
            await session.execute(
                update(Gpu).where(Gpu.uuid == sick.gpus[1].uuid).values(healthy=False)
            )
        stale = [
            wanted(offline, [0]),
            wanted(sick, [0, 1]),
            wanted(dear, [0], max_price_per_hour=Decimal("2.99")),
        ]
        assert await reserve_exact(db, *stale) == {}
        assert await holders(db, sick) == [None, None]
        ok = wanted(dear, [0], max_price_per_hour=Decimal("3.00"))
        assert set(await reserve_exact(db, ok)) == {ok.job_id}

    async def test_gpus_another_replica_has_locked_are_skipped_not_waited_for(
        self, db: async_sessionmaker
    ) -> None:
        async with db.begin() as session:
            machine = await create_provider(session, gpus=3)
        blocked, free = wanted(machine, [0, 1]), wanted(machine, [2])
        async with db.begin() as other:
            # Another replica's reservation of GPU 0, not committed yet.
            assert await capacity.reserve_exact(other, [wanted(machine, [0])])
            async with asyncio.timeout(5):
                got = await reserve_exact(db, blocked, free)
            assert set(got) == {free.job_id}
        assert (await holders(db, machine))[1:] == [None, free.job_id]

    async def test_concurrent_reservations_never_share_a_gpu(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            machine = await create_provider(session, gpus=4)
        results = await asyncio.gather(
            *[reserve_exact(db, wanted(machine, [i % 4, (i + 1) % 4])) for i in range(12)]
        )
        uuids = [u for got in results for r in got.values() for u in r.gpu_uuids]
        assert len(uuids) == len(set(uuids)) and len(uuids) <= 4
        held = [h for h in await holders(db, machine) if h is not None]
        assert len(held) == len(uuids)


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
