"""The fleet index kept in step with a real PostgreSQL through capacity_seq."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import literal, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from common.types import version_number
from provider_registry.models import CREDENTIAL_REVOKED, DRAINING, LEFT, OFFLINE, Gpu
from scheduler.fleet_index import Demand, FleetIndex
from scheduler.fleet_sync import FleetSync, version_sql
from tests.scheduler.fleet_factories import add_machine, capacity_seqs, set_gpus, set_provider


async def synced(db: async_sessionmaker, lookback: int = 100_000) -> FleetSync:
    sync = FleetSync(FleetIndex(), lookback=lookback)
    async with db() as session:
        await sync.full(session)
    return sync


async def refresh(db: async_sessionmaker, sync: FleetSync) -> int:
    async with db() as session:
        return await sync.refresh(session)


@asynccontextmanager
async def reserved_uncommitted(db: async_sessionmaker, provider_id: str) -> AsyncIterator[None]:
    """The machine's GPUs reserved in a transaction that commits when the block ends: it
    takes its capacity_seq values now, and commits them after whatever the block does."""
    async with db.begin() as late:
        await late.execute(
            Gpu.__table__.update()
            .where(Gpu.provider_id == provider_id)
            .values(reserved_job_id="late")
        )
        yield


def chosen(sync: FleetSync, **demand) -> str | None:  # type: ignore[no-untyped-def]
    choice = sync.index.choose(Demand(**demand))
    return choice.provider_id if choice else None


class TestFull:
    async def test_loads_every_machine_that_has_not_left(self, db: async_sessionmaker) -> None:
        h100 = await add_machine(
            db,
            gpus=8,
            model="H100 80GB HBM3",
            vram_mb=81920,
            price="2.50",
            compute_capability="9.0",
            cuda_version="12.8",
            region="us-east",
            labels={"nvlink": "yes"},
            reliability=0.99,
            cpu_count=64,
            memory_mb=1048576,
        )
        t4 = await add_machine(
            db, gpus=1, model="T4", price="0.10", compute_capability="7.5", cpu_count=None
        )
        offline = await add_machine(db, gpus=2, state=OFFLINE, price="0.01")
        sim = await add_machine(db, gpus=2, simulated=True, price="0.02")
        await add_machine(db, gpus=2, state=LEFT, price="0.01")
        sync = FleetSync(FleetIndex())
        async with db() as session:
            assert await sync.full(session) == 4
        index = sync.index
        assert len(index) == 4 and offline.id in index and sim.id in index

        choice = index.choose(Demand(count=8, models=("H100",)))
        assert choice.provider_id == h100.id and choice.model == "H100 80GB HBM3"
        assert choice.price_per_hour == 2.5
        assert chosen(sync, count=1) == t4.id
        assert chosen(sync, count=1, allow_simulated=True) == sim.id
        # Every column made it: capability, CUDA, region, labels, CPUs and memory.
        spec = dict(
            count=2,
            min_vram_mb=81920,
            min_compute_capability=9000,
            min_cuda_version=12008,
            region="us-east",
            labels=(("nvlink", "yes"),),
            cpus=16,
            memory_mb=262144,
        )
        assert chosen(sync, **spec) == h100.id
        assert chosen(sync, **{**spec, "min_cuda_version": 12009}) is None
        assert chosen(sync, **{**spec, "cpus": 17}) is None
        assert chosen(sync, count=1, models=("T4",), cpus=1) is None  # CPUs unknown
        # An offline machine cannot take work, but a job that fits it is not impossible.
        assert index.why_unplaceable(Demand(count=2, max_price_per_hour=0.01)) is None
        assert chosen(sync, count=2, max_price_per_hour=0.01) is None

    async def test_an_empty_fleet(self, db: async_sessionmaker) -> None:
        sync = await synced(db)
        assert len(sync.index) == 0
        assert await refresh(db, sync) == 0

    async def test_replaces_the_index(self, db: async_sessionmaker) -> None:
        first = await add_machine(db)
        sync = await synced(db)
        await set_provider(db, first.id, state=LEFT)
        second = await add_machine(db)
        async with db() as session:
            assert await sync.full(session) == 1
        assert first.id not in sync.index and second.id in sync.index


class TestRefresh:
    async def test_a_new_provider_appears(self, db: async_sessionmaker) -> None:
        sync = await synced(db)
        machine = await add_machine(db, gpus=2)
        assert chosen(sync, count=1) is None
        assert await refresh(db, sync) == 1
        assert chosen(sync, count=2) == machine.id

    async def test_reservations_and_releases(self, db: async_sessionmaker) -> None:
        machine = await add_machine(db, gpus=2)
        sync = await synced(db)
        await set_gpus(db, machine.id, machine.gpus[0].uuid, reserved_job_id="job-1")
        assert await refresh(db, sync) == 1
        assert chosen(sync, count=2) is None
        assert chosen(sync, count=1) == machine.id
        await set_gpus(db, machine.id, reserved_job_id=None)
        assert await refresh(db, sync) == 1
        assert chosen(sync, count=2) == machine.id

    async def test_an_unhealthy_gpu(self, db: async_sessionmaker) -> None:
        machine = await add_machine(db, gpus=2)
        sync = await synced(db)
        await set_gpus(db, machine.id, machine.gpus[1].uuid, healthy=False)
        assert await refresh(db, sync) == 1
        assert chosen(sync, count=2) is None
        assert chosen(sync, count=1) == machine.id
        assert sync.index.why_unplaceable(Demand(count=2)) is None

    @pytest.mark.parametrize(
        "values",
        [
            {"state": OFFLINE},
            {"state": DRAINING, "drain_requested": True},
            {"suspended_reason": CREDENTIAL_REVOKED},
        ],
    )
    async def test_machines_that_may_take_no_work(
        self, db: async_sessionmaker, values: dict
    ) -> None:
        machine = await add_machine(db, gpus=1)
        sync = await synced(db)
        await set_provider(db, machine.id, **values)
        assert await refresh(db, sync) == 1
        assert chosen(sync, count=1) is None
        assert machine.id in sync.index
        assert sync.index.why_unplaceable(Demand(count=1)) is None

    async def test_a_machine_that_left_leaves_the_index(self, db: async_sessionmaker) -> None:
        machine = await add_machine(db, gpus=1)
        sync = await synced(db)
        await set_provider(db, machine.id, state=LEFT)
        assert await refresh(db, sync) == 1
        assert machine.id not in sync.index
        # Its row, now applied, is not read again.
        assert await refresh(db, sync) == 0

    async def test_metrics_do_not_count_as_changes(self, db: async_sessionmaker) -> None:
        machine = await add_machine(db, gpus=2)
        sync = await synced(db)
        async with db() as session:
            before = await capacity_seqs(session, machine.id)
        await set_gpus(db, machine.id, utilization_pct=93.0, temperature_c=71.0, power_w=300.0)
        await set_provider(db, machine.id, uptime=0.5)
        async with db() as session:
            assert await capacity_seqs(session, machine.id) == before
        assert await refresh(db, sync) == 0

    async def test_only_changed_machines_are_reloaded(self, db: async_sessionmaker) -> None:
        machines = [await add_machine(db, gpus=2) for _ in range(6)]
        sync = await synced(db)
        assert await refresh(db, sync) == 0
        await set_gpus(db, machines[0].id, machines[0].gpus[0].uuid, reserved_job_id="j")
        await set_gpus(db, machines[1].id, price_per_hour=0.9)
        await set_provider(db, machines[2].id, region="ap-south", labels={"tier": "gold"})
        assert await refresh(db, sync) == 3
        assert await refresh(db, sync) == 0
        assert chosen(sync, count=1, region="ap-south") == machines[2].id
        assert chosen(sync, count=1, labels=(("tier", "gold"),)) == machines[2].id

    async def test_a_late_commit_with_an_older_value_is_caught(
        self, db: async_sessionmaker
    ) -> None:
        """T1 takes its value first but commits last: the refresh in between read
        T2's higher value; the one after T1's commit must still read T1's row."""
        slow, quick = await add_machine(db, gpus=1), await add_machine(db, gpus=1)
        sync = await synced(db)
        async with reserved_uncommitted(db, slow.id):
            await set_gpus(db, quick.id, reserved_job_id="early")  # a higher value, first
            assert await refresh(db, sync) == 1
            assert chosen(sync, count=1) == slow.id
        assert await refresh(db, sync) == 1
        assert chosen(sync, count=1) is None

    async def test_a_transaction_open_across_many_changes_is_caught(
        self, db: async_sessionmaker
    ) -> None:
        """However many refreshes and changes of other machines come meanwhile."""
        slow = await add_machine(db, gpus=1)
        others = [await add_machine(db, gpus=1) for _ in range(5)]
        sync = await synced(db)
        async with reserved_uncommitted(db, slow.id):
            for round_ in range(20):
                for other in others:
                    await set_gpus(
                        db, other.id, reserved_job_id=f"j{round_}" if round_ % 2 else None
                    )
                await refresh(db, sync)
            assert chosen(sync, count=1) == slow.id
        assert await refresh(db, sync) == 1
        assert chosen(sync, count=1) is None

    async def test_only_what_changed_since_the_last_look_is_read_again(
        self, db: async_sessionmaker
    ) -> None:
        machines = [await add_machine(db, gpus=2) for _ in range(4)]
        sync = await synced(db)
        for machine in machines:
            await set_gpus(db, machine.id, price_per_hour=0.7)
        assert await refresh(db, sync) == 4
        # Nothing written since, no transaction open: the next look reads no row again.
        assert await refresh(db, sync) == 0
        assert sync.reread == 0

    async def test_past_the_cap_a_late_commit_waits_for_full(self, db: async_sessionmaker) -> None:
        slow, quick = await add_machine(db, gpus=1), await add_machine(db, gpus=1)
        sync = await synced(db, lookback=0)
        async with reserved_uncommitted(db, slow.id):
            await set_gpus(db, quick.id, reserved_job_id="early")
            assert await refresh(db, sync) == 1
        assert await refresh(db, sync) == 0
        assert chosen(sync, count=1) == slow.id  # stale
        async with db() as session:
            await sync.full(session)
        assert chosen(sync, count=1) is None


class TestReload:
    async def test_removed_gpus_vanish(self, db: async_sessionmaker) -> None:
        machine = await add_machine(db, gpus=4)
        sync = await synced(db)
        async with db.begin() as session:
            await session.execute(
                Gpu.__table__.delete().where(Gpu.provider_id == machine.id, Gpu.index >= 1)
            )
        assert chosen(sync, count=4) == machine.id  # not yet seen
        async with db() as session:
            await sync.reload(session, [machine.id])
        assert chosen(sync, count=2) is None
        assert chosen(sync, count=1) == machine.id
        assert sync.index.why_unplaceable(Demand(count=2)) is not None

    async def test_unknown_and_left_machines_are_dropped(self, db: async_sessionmaker) -> None:
        machine = await add_machine(db, gpus=1)
        sync = await synced(db)
        await set_provider(db, machine.id, state=LEFT)
        async with db() as session:
            await sync.reload(session, [machine.id, "no-such-provider"])
            await sync.reload(session, [])
        assert len(sync.index) == 0

    async def test_concurrent_reads_of_one_index(self, db: async_sessionmaker) -> None:
        machines = [await add_machine(db, gpus=1) for _ in range(3)]
        sync = await synced(db)

        async def one(provider_id: str) -> None:
            async with db() as session:
                await sync.reload(session, [provider_id])

        await asyncio.gather(*(one(m.id) for m in machines))
        assert len(sync.index) == 3


class TestVersions:
    @pytest.mark.parametrize("text", ["8.9", "12.10", "9", "10.0", "8.", "", "x.y", "1.2.3", None])
    async def test_version_sql_agrees_with_version_number(
        self, db: async_sessionmaker, text: str | None
    ) -> None:
        async with db() as session:
            assert await session.scalar(select(version_sql(literal(text)))) == (
                version_number(text)
            )
