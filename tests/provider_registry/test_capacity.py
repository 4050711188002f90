"""GPU reservations on a real PostgreSQL: one owner per GPU, whatever the concurrency."""

import asyncio
import uuid
from decimal import Decimal

from sqlalchemy.ext.asyncio import async_sessionmaker

from provider_registry import capacity, offers, service
from provider_registry.capacity import GpuRequest
from provider_registry.models import OFFLINE
from provider_registry.offers import OfferQuery
from tests.provider_registry.factories import create_provider


async def reserve(db: async_sessionmaker, request: GpuRequest, job_id: str | None = None):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await capacity.reserve(session, job_id or str(uuid.uuid4()), request)


class TestReserve:
    async def test_cheapest_machine_with_room_wins(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            cheap_small = await create_provider(session, gpus=2, price="1.00")
            dear_big = await create_provider(session, gpus=4, price="2.00")
        one = await reserve(db, GpuRequest(count=1))
        assert one.provider_id == cheap_small.id
        three = await reserve(db, GpuRequest(count=3))
        assert three.provider_id == dear_big.id
        assert len(set(three.gpu_uuids)) == 3
        assert three.price_per_gpu_hour == Decimal("2.00")

    async def test_constraints_are_honoured(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, model="T4", vram_mb=16384, price="0.2")
            await create_provider(session, model="A100", vram_mb=81920, price="3.0")
            await create_provider(session, model="H100", vram_mb=81920, state=OFFLINE)
            await create_provider(session, model="L4", simulated=True)
        assert (await reserve(db, GpuRequest(count=1, min_vram_mb=40000))).gpu_uuids
        assert await reserve(db, GpuRequest(count=1, models=["h100"])) is None
        assert (
            await reserve(db, GpuRequest(count=1, models=["A100"], max_price_per_hour=Decimal("1")))
            is None
        )
        assert await reserve(db, GpuRequest(count=1, models=["L4"])) is None
        assert await reserve(db, GpuRequest(count=1, models=["L4"], allow_simulated=True))

    async def test_concurrent_reservations_never_share_a_gpu(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            for _ in range(4):
                await create_provider(session, gpus=2)
        results = await asyncio.gather(*[reserve(db, GpuRequest(count=1)) for _ in range(20)])
        won = [r for r in results if r is not None]
        assert len(won) == 8
        uuids = [u for r in won for u in r.gpu_uuids]
        assert len(uuids) == len(set(uuids)) == 8
        assert await reserve(db, GpuRequest(count=1)) is None

    async def test_release_frees_and_is_idempotent(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, gpus=1)
        job_id = str(uuid.uuid4())
        assert await reserve(db, GpuRequest(count=1), job_id)
        assert await reserve(db, GpuRequest(count=1)) is None
        async with db.begin() as session:
            assert await capacity.release(session, job_id) == 1
            assert await capacity.release(session, job_id) == 0
        assert await reserve(db, GpuRequest(count=1))


class TestWhyUnplaceable:
    async def test_reasons_name_the_missing_thing(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            assert "any GPU" in await capacity.why_unplaceable(session, GpuRequest(count=1))
            await create_provider(session, gpus=2, model="RTX 4090", price="0.5")

            async def why(**kw) -> str | None:  # type: ignore[no-untyped-def]
                return await capacity.why_unplaceable(session, GpuRequest(**kw))

            assert await why(count=2) is None
            assert "model H100" in await why(count=1, models=["H100"])
            assert "48 GiB" in await why(count=1, min_vram_mb=48 * 1024)
            assert "0.1" in await why(count=1, max_price_per_hour=Decimal("0.1"))
            assert "3 such GPUs" in await why(count=3)
            # Busy GPUs still count: the job waits, it is not impossible.
            await capacity.reserve(session, str(uuid.uuid4()), GpuRequest(count=2))
            assert await why(count=2) is None


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
        assert await reserve(db, GpuRequest(count=1, models=["A10"])) is None
        async with db.begin() as session:
            page = await offers.search_offers(session, OfferQuery(models=["A10"]))
            assert page.offers == [] and page.total == 0
            # Re-enabling the owner brings back what disabling took, not a revoked machine.
            assert await service.resume_owner(session, machine.owner_id) == 1
        assert (await reserve(db, GpuRequest(count=1, models=["A10"]))).provider_id == machine.id
        assert await reserve(db, GpuRequest(count=1, models=["A10"])) is None
