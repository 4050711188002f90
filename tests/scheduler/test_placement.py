"""Placement passes on a real PostgreSQL: constraints, scoring, fairness, races."""

import asyncio
import uuid
from collections import Counter
from datetime import UTC, datetime
from unittest.mock import AsyncMock

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from common.types import EGRESS_LABEL
from provider_registry.models import DRAINING, Gpu
from scheduler import placement, queue_order, states
from scheduler.fleet_index import Weights
from scheduler.models import Job
from scheduler.settings import SchedulerSettings
from tests.fixtures.database import statements
from tests.provider_registry.factories import create_provider
from tests.scheduler.placing import load, place, placer, submit


async def placed_on(db: async_sessionmaker, **job) -> str | None:  # type: ignore[no-untyped-def]
    """Submits one job, runs a pass, returns the provider it landed on."""
    async with db.begin() as session:
        await submit(session, **job)
    placements = (await place(db)).placements
    return placements[0].provider_id if placements else None


class TestConstraints:
    async def test_every_constraint_is_honoured(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            cheap = await create_provider(session, model="RTX 3090", price="0.20", gpus=1)
            h100 = await create_provider(
                session,
                model="H100 80GB HBM3",
                vram_mb=81559,
                compute_capability="9.0",
                cuda_version="12.8",
                price="2.50",
                region="eu-west",
                labels={"tier": "datacenter"},
                cpu_count=128,
                memory_mb=1024 * 1024,
                gpus=8,
            )
            await create_provider(session, model="H100 PCIe", region="us-east", gpus=1, price="2")
            await create_provider(session, model="RTX 4090", state=DRAINING, price="0.01")
        # Unconstrained: the cheapest machine.
        assert await placed_on(db) == cheap.id
        # 128 CPUs over 8 GPUs: 16 per GPU (and 128 GB of memory).
        assert await placed_on(db, resources={"gpus": 1, "cpus": 17}) is None
        # A model family: "H100" matches NVML's "H100 80GB HBM3".
        cases = [
            {"gpu_models": ["H100"], "region": "eu-west"},
            {"min_vram_gb": 40},
            {"min_compute_capability": "9.0"},
            {"min_cuda_version": "12.5"},
            {"labels": {"tier": "datacenter"}},
            {"gpus": 2, "cpus": 32},
            {"memory_gb": 100},
        ]
        for resources in cases:
            assert await placed_on(db, resources=resources) == h100.id, resources

    async def test_price_ceiling_and_simulated(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, price="0.90", gpus=1)
            simulated = await create_provider(session, price="0.10", simulated=True, gpus=1)
        assert await placed_on(db, max_price_per_gpu_hour="0.5") is None
        # Simulated GPUs serve dev-mode platforms only.
        assert (await place(db)).placements == []
        [placed] = (await place(db, allow_simulated=True)).placements
        assert placed.provider_id == simulated.id

    async def test_unplaceable_job_says_why_and_runs_when_capacity_appears(
        self, db: async_sessionmaker
    ) -> None:
        async with db.begin() as session:
            await create_provider(session, model="RTX 4090", gpus=2)
            never = await submit(session, resources={"gpu_models": ["A100"]})
            too_many = await submit(session, resources={"gpus": 4})
            labelled = await submit(session, resources={"labels": {"nvlink": "yes"}})
        result = await place(db)
        assert result.placements == [] and result.waiting == 3
        assert "of model A100" in (await load(db, never.id)).waiting_reason
        assert "4 such GPUs on one machine" in (await load(db, too_many.id)).waiting_reason
        assert "nvlink=yes" in (await load(db, labelled.id)).waiting_reason
        # Busy, not impossible: a job that fits a machine whose GPUs are taken waits.
        async with db.begin() as session:
            pair = {(await submit(session, resources={"gpus": 2})).id for _ in range(2)}
        [placed] = (await place(db)).placements
        [waiting] = pair - {placed.task.job_id}
        assert (await load(db, waiting)).waiting_reason == placement.WAITING_FOR_CAPACITY
        async with db.begin() as session:
            machine = await create_provider(session, model="A100", gpus=8)
        placed = {p.task.job_id: p.provider_id for p in (await place(db)).placements}
        assert placed[never.id] == machine.id
        assert (await load(db, never.id)).waiting_reason is None

    async def test_a_pass_looks_past_a_head_that_fits_nowhere(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, gpus=2)
            stuck = [await submit(session, owner_id="o", resources={"gpus": 4}) for _ in range(3)]
            small = [await submit(session, owner_id="o") for _ in range(3)]
        for job in stuck:
            job.created_at = datetime(2026, 1, 1, tzinfo=UTC)  # the head of the queue
        async with db.begin() as session:
            for job in stuck:
                await session.merge(job)
        result = await placer(db, batch=2).run_pass()
        # Three jobs read past the first batch's worth; two of the small ones fill a batch.
        assert {p.task.job_id for p in result.placements} < {j.id for j in small}
        assert len(result.placements) == 2
        for job in stuck:
            assert "4 such GPUs" in (await load(db, job.id)).waiting_reason

    async def test_egress_only_where_the_owner_allows_network(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            closed = await create_provider(session, price="0.10", gpus=1)
            job = await submit(session, egress=True)
        result = await place(db)
        assert result.placements == []
        reason = (await load(db, job.id)).waiting_reason or ""
        assert "allows network access (egress)" in reason and "gpumarket/" not in reason
        async with db.begin() as session:
            open_ = await create_provider(
                session, price="0.90", gpus=1, labels=dict([EGRESS_LABEL])
            )
            plain = await submit(session)
        placed = {p.task.job_id: p for p in (await place(db)).placements}
        assert placed[job.id].provider_id == open_.id and placed[job.id].task.egress
        assert placed[plain.id].provider_id == closed.id and not placed[plain.id].task.egress
        assert (await load(db, job.id)).egress


class TestScoring:
    async def test_cheapest_then_reliability_then_packing(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, price="0.60", gpus=1)
            shaky = await create_provider(session, price="0.50", gpus=1, reliability=0.6)
            steady = await create_provider(session, price="0.50", gpus=1, reliability=0.99)
        assert await placed_on(db) == steady.id
        assert await placed_on(db) == shaky.id

    async def test_a_partly_used_machine_fills_before_an_empty_one(
        self, db: async_sessionmaker
    ) -> None:
        async with db.begin() as session:
            empty = await create_provider(session, gpus=8)
            partly = await create_provider(session, gpus=8)
            # Three of eight taken: one of those jobs holds them.
            holder = await submit(session, resources={"gpus": 3})
        async with db.begin() as session:
            await session.execute(
                Gpu.__table__.update()
                .where(Gpu.provider_id == partly.id, Gpu.index < 3)
                .values(reserved_job_id=holder.id)
            )
            await session.execute(
                Job.__table__.update().where(Job.id == holder.id).values(status=states.RUNNING)
            )
        assert await placed_on(db) == partly.id
        # An 8-GPU job still finds the whole machine kept free.
        assert await placed_on(db, resources={"gpus": 8}) == empty.id

    async def test_weights_come_from_configuration(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, price="0.50", gpus=1, reliability=0.5)
            reliable = await create_provider(session, price="0.60", gpus=1, reliability=1.0)
            await submit(session)
        # Reliability worth $1/GPU-hour per unit: 0.50 + 0.5 > 0.60 + 0.
        [placed] = (await place(db, weights=Weights(price=1, reliability=1.0))).placements
        assert placed.provider_id == reliable.id


class TestOrder:
    async def test_priority_then_fifo_within_a_requester(self, db: async_sessionmaker) -> None:
        owner = str(uuid.uuid4())
        async with db.begin() as session:
            await create_provider(session, gpus=1)
        ids = []
        for priority in (0, 5, 0, 5):
            async with db.begin() as session:
                ids.append((await submit(session, owner, priority=priority)).id)
        order = []
        for _ in ids:
            [placed] = (await place(db, batch=1)).placements
            order.append(placed.task.job_id)
            async with db.begin() as session:
                await session.execute(
                    Gpu.__table__.update()
                    .where(Gpu.reserved_job_id == placed.task.job_id)
                    .values(reserved_job_id=None)
                )
                await session.execute(
                    Job.__table__.update()
                    .where(Job.id == placed.task.job_id)
                    .values(status=states.SUCCEEDED)
                )
        assert order == [ids[1], ids[3], ids[0], ids[2]]

    async def test_a_burst_does_not_hold_back_another_requesters_job(
        self, db: async_sessionmaker
    ) -> None:
        bursty, patient = str(uuid.uuid4()), str(uuid.uuid4())
        async with db.begin() as session:
            await create_provider(session, gpus=4)
            for _ in range(2000):
                await submit(session, bursty)
        async with db.begin() as session:
            single = await submit(session, patient)
        # One round, four GPUs: the single job is among the first placed.
        placed = [p.task.job_id for p in (await place(db)).placements]
        assert len(placed) == 4 and single.id in placed[:2]

    async def test_gpus_held_push_a_requester_back(self, db: async_sessionmaker) -> None:
        heavy, light = str(uuid.uuid4()), str(uuid.uuid4())
        async with db.begin() as session:
            await create_provider(session, gpus=4)
            for _ in range(3):
                await submit(session, heavy)
        assert len((await place(db, batch=3)).placements) == 3
        async with db.begin() as session:
            mine = await submit(session, heavy)
            theirs = await submit(session, light)
        [placed] = (await place(db)).placements
        assert placed.task.job_id == theirs.id
        assert (await load(db, mine.id)).status == states.QUEUED


class TestReplicas:
    async def test_racing_schedulers_never_share_a_gpu(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            for _ in range(20):
                await create_provider(session, gpus=3)
            for _ in range(100):
                await submit(session)
        replicas = [placer(db, batch=25) for _ in range(3)]
        results = []
        for _ in range(5):
            results += await asyncio.gather(*(r.run_pass() for r in replicas))
        placements = [p for r in results for p in r.placements]
        assert len(placements) == 60  # every GPU, and no more
        uuids = Counter(u for p in placements for u in p.task.gpu_uuids)
        assert max(uuids.values()) == 1
        async with db() as session:
            held = await session.scalar(
                select(func.count()).select_from(Gpu).where(Gpu.reserved_job_id.is_not(None))
            )
            assigned = await session.scalar(
                select(func.count()).select_from(Job).where(Job.status == states.ASSIGNED)
            )
        assert held == assigned == 60

    async def test_replicas_read_different_jobs(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            jobs = [(await submit(session, owner_id="one")).id for _ in range(6)]
        now = datetime.now(UTC)
        async with db.begin() as first, db.begin() as second:
            held = [r.id for r in await queue_order.next_jobs(first, now, 4)]
            # The first replica's pass is still open: the second reads past its jobs.
            rest = [r.id for r in await queue_order.next_jobs(second, now, 4)]
        assert len(held) == 4 and sorted(held + rest) == sorted(jobs)

    async def test_jobs_that_lost_their_race_are_decided_again_together(
        self, db: async_sessionmaker
    ) -> None:
        async with db.begin() as session:
            for _ in range(10):
                await create_provider(session, gpus=1)
            for _ in range(10):
                await submit(session)
        late = placer(db)
        await late.resync()
        # It will not see what the other replica reserves meanwhile (as when that
        # replica commits between this one's refresh and its reservation), and breaks
        # ties in the same order: it names the very GPUs the other one took.
        late.sync.refresh = AsyncMock(return_value=0)  # type: ignore[method-assign]
        first = await placer(db, batch=5).run_pass()
        assert len(first.placements) == 5
        with statements(db) as sent:
            second = await late.run_pass()
        assert len(second.placements) == 5 and second.races_lost == 5
        # One reservation for the pass, one more for the five losers: not one per job.
        assert sum(sql.lstrip().startswith("WITH free AS") for sql in sent) == 2
        uuids = Counter(u for r in (first, second) for p in r.placements for u in p.task.gpu_uuids)
        assert len(uuids) == 10 and max(uuids.values()) == 1

    async def test_array_position_reaches_the_task(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            await create_provider(session, gpus=1)
            job = await submit(session, env={"A": "1"})
            job.array_id, job.array_index = str(uuid.uuid4()), 7
        [placed] = (await place(db)).placements
        assert placed.task.env == {
            "A": "1",
            "GPUMARKET_ARRAY_ID": job.array_id,
            "GPUMARKET_ARRAY_INDEX": "7",
        }


def test_the_settings_and_the_index_agree_on_default_weights() -> None:
    fields = SchedulerSettings.model_fields
    assert Weights() == Weights(
        price=fields["score_price_weight"].default,
        reliability=fields["score_reliability_weight"].default,
        packing=fields["score_packing_weight"].default,
    )


class TestStatements:
    async def test_a_pass_with_nothing_to_place_leaves_the_fleet_view_alone(
        self, db: async_sessionmaker
    ) -> None:
        async with db.begin() as session:
            await create_provider(session, gpus=1)
        replica = placer(db)
        with statements(db) as sent:
            assert (await replica.run_pass()).placements == []
        assert not any("capacity_seq" in sql for sql in sent)
        # The first pass with a job reads the fleet, and everything changed before it.
        async with db.begin() as session:
            job = await submit(session)
        [placed] = (await replica.run_pass()).placements
        assert placed.task.job_id == job.id

    async def test_a_pass_reserves_all_its_jobs_in_one_statement(
        self, db: async_sessionmaker
    ) -> None:
        async with db.begin() as session:
            for _ in range(10):
                await create_provider(session, gpus=4, price="0.50")
            for i in range(40):
                await submit(session, owner_id=f"owner-{i % 3}")
        with statements(db) as sent:
            result = await place(db)
        assert len(result.placements) == 40 and result.races_lost == 0
        assert sum(sql.lstrip().startswith("WITH free AS") for sql in sent) == 1
        assert not any("LIMIT" in sql and "UPDATE gpus" in sql for sql in sent)
        uuids = [u for p in result.placements for u in p.task.gpu_uuids]
        assert len(uuids) == len(set(uuids)) == 40
