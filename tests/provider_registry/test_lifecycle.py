"""Drain, leave, health and reliability on a real PostgreSQL."""

from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import selectinload

from common.errors import Conflict, NotFound
from common.messages import GpuMetrics, Heartbeat
from provider_registry import capacity, fleet_metrics, liveness, reliability, service
from provider_registry.models import (
    DRAINING,
    LEFT,
    OFFLINE,
    ONLINE,
    Provider,
    ProviderOutage,
    ProviderTaskDay,
)
from tests.provider_registry.factories import create_provider, reserve_any


async def reload(db: async_sessionmaker, provider_id: str) -> Provider:
    async with db() as session:
        found = await session.get(Provider, provider_id, options=[selectinload(Provider.gpus)])
        assert found is not None
        return found


async def beat(db: async_sessionmaker, provider: Provider, **kw) -> list[str]:  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await liveness.ingest_heartbeats(
            session, [Heartbeat(provider_id=provider.id, at=datetime.now(UTC), **kw)]
        )


class TestDrainAndLeave:
    async def test_drain_survives_heartbeats_and_takes_no_work(self, db) -> None:  # type: ignore[no-untyped-def]
        async with db.begin() as session:
            machine = await create_provider(session, gpus=1)
        async with db.begin() as session:
            await service.set_drain(session, machine.id, True)
        await beat(db, machine)
        assert (await reload(db, machine.id)).state == DRAINING
        async with db.begin() as session:
            assert await reserve_any(session, "j") is None
            await service.set_drain(session, machine.id, False)
        await beat(db, machine)
        assert (await reload(db, machine.id)).state == ONLINE

    async def test_leave_is_refused_while_a_task_runs_then_is_for_good(self, db) -> None:  # type: ignore[no-untyped-def]
        async with db.begin() as session:
            machine = await create_provider(session, gpus=1)
            assert await reserve_any(session, "j") is not None
        async with db.begin() as session:
            with pytest.raises(Conflict, match="1 task"):
                await service.leave(session, machine.id)
        async with db.begin() as session:
            await capacity.release(session, "j")
            await service.leave(session, machine.id)
        # A stale daemon's heartbeat does not bring it back, and it is gone from listings.
        await beat(db, machine)
        assert (await reload(db, machine.id)).state == LEFT
        async with db() as session:
            assert await service.list_providers(session, machine.owner_id) == []
            # A retried leave (drain, then leave) goes through; coming back needs a new join.
            assert (await service.set_drain(session, machine.id, True)).state == LEFT
            assert (await service.leave(session, machine.id)).state == LEFT
            with pytest.raises(Conflict, match="join it again"):
                await service.set_drain(session, machine.id, False)
            with pytest.raises(NotFound):
                await service.leave(session, "00000000-0000-0000-0000-000000000000")


class TestHealth:
    async def test_an_unhealthy_gpu_is_stored_and_not_reserved_until_it_recovers(self, db) -> None:  # type: ignore[no-untyped-def]
        async with db.begin() as session:
            machine = await create_provider(session, gpus=1)
        uuid = machine.gpus[0].uuid
        sick = GpuMetrics(
            uuid=uuid,
            ecc_errors=2,
            xid_errors=1,
            healthy=False,
            health_reason="2 uncorrectable ECC errors; reset the GPU",
        )
        await beat(db, machine, gpus=[sick])
        gpu = (await reload(db, machine.id)).gpus[0]
        assert (gpu.healthy, gpu.ecc_errors, gpu.xid_errors) == (False, 2, 1)
        assert gpu.health_reason == "2 uncorrectable ECC errors; reset the GPU"
        async with db.begin() as session:
            assert await reserve_any(session, "j") is None
        await beat(db, machine, gpus=[GpuMetrics(uuid=uuid, ecc_errors=0)])
        async with db.begin() as session:
            assert await reserve_any(session, "j") is not None


class TestReliability:
    async def test_uptime_and_task_outcomes_make_the_score(self, db) -> None:  # type: ignore[no-untyped-def]
        now = datetime.now(UTC)
        async with db.begin() as session:
            steady = await create_provider(session)
            flaky = await create_provider(session)
            await session.execute(update(Provider).values(created_at=now - timedelta(days=10)))
            # Offline for one of the window's seven days, in two spans (one still open).
            session.add_all(
                [
                    ProviderOutage(
                        provider_id=flaky.id,
                        started_at=now - timedelta(days=3),
                        ended_at=now - timedelta(hours=12),
                        lost_published=True,
                    ),
                    ProviderOutage(
                        provider_id=flaky.id,
                        started_at=now - timedelta(hours=12),
                        lost_published=True,
                    ),
                    # Before the window: does not count.
                    ProviderOutage(
                        provider_id=steady.id,
                        started_at=now - timedelta(days=9),
                        ended_at=now - timedelta(days=8),
                        lost_published=True,
                    ),
                ]
            )
            for _ in range(15):
                await reliability.record_task_outcome(session, flaky.id, infrastructure=False)
            for _ in range(5):
                await reliability.record_task_outcome(session, flaky.id, infrastructure=True)
            # Outside the window: does not count.
            await reliability.record_task_outcome(
                session, steady.id, infrastructure=True, day=date.today() - timedelta(days=30)
            )
        async with db.begin() as session:
            assert await reliability.recompute(session, window_days=7) == 1  # steady stays 1.0
        s, f = await reload(db, steady.id), await reload(db, flaky.id)
        assert (s.uptime, s.reliability) == (1.0, 1.0)
        assert f.uptime == pytest.approx(4 / 7, abs=1e-3)
        assert f.reliability == pytest.approx(4 / 7 * (15 + 5) / (20 + 5), abs=1e-3)
        async with db() as session:
            days = (await session.scalars(select(ProviderTaskDay))).all()
        assert sum(d.ok for d in days) == 15 and sum(d.infrastructure for d in days) == 6

    async def test_outcomes_counted_together_add_up_like_one_by_one(self, db) -> None:  # type: ignore[no-untyped-def]
        day = date(2026, 1, 2)
        async with db.begin() as session:
            a, b = await create_provider(session), await create_provider(session)
            await reliability.record_task_outcome(session, a.id, infrastructure=True, day=day)
        async with db.begin() as session:
            await reliability.record_task_outcomes(
                session,
                [(b.id, False), (a.id, False), (b.id, True), (a.id, False), (b.id, False)],
                day=day,
            )
            await reliability.record_task_outcomes(session, [], day=day)
        async with db() as session:
            days = (await session.scalars(select(ProviderTaskDay))).all()
        counts = {d.provider_id: (d.ok, d.infrastructure) for d in days}
        assert counts == {a.id: (2, 1), b.id: (2, 1)}
        assert {d.day for d in days} == {day}

    async def test_a_new_machine_starts_trusted(self, db) -> None:  # type: ignore[no-untyped-def]
        async with db.begin() as session:
            machine = await create_provider(session)
            await reliability.recompute(session, window_days=7)
        assert (await reload(db, machine.id)).reliability == 1.0


class TestOutbox:
    async def test_each_loss_is_published_until_marked(self, db) -> None:  # type: ignore[no-untyped-def]
        async with db.begin() as session:
            machine = await create_provider(session, gpus=2)
            await reserve_any(session, "job-a")
            await session.execute(
                update(Provider).values(last_heartbeat_at=datetime.now(UTC) - timedelta(minutes=5))
            )
        async with db.begin() as session:
            assert await liveness.mark_silent_offline(session, ttl_s=30) == [machine.id]
            assert await liveness.mark_silent_offline(session, ttl_s=30) == []
        async with db.begin() as session:
            [lost] = await liveness.unpublished_losses(session)
            assert lost.event.provider_id == machine.id and lost.event.job_ids == ["job-a"]
        async with db.begin() as session:
            # Not marked yet (say NATS was down): still there next time.
            assert len(await liveness.unpublished_losses(session)) == 1
            await liveness.mark_published(session, [lost.outage_id])
        async with db.begin() as session:
            assert await liveness.unpublished_losses(session) == []
        assert (await reload(db, machine.id)).state == OFFLINE


class TestFleetMetrics:
    async def test_snapshot_holds_live_gpus_and_state_counts(self, db) -> None:  # type: ignore[no-untyped-def]
        async with db.begin() as session:
            live = await create_provider(session, gpus=2)
            await create_provider(session, gpus=1, state=OFFLINE)
        await beat(
            db,
            live,
            gpus=[
                GpuMetrics(
                    uuid=live.gpus[0].uuid,
                    utilization_pct=97.0,
                    memory_used_mb=1024,
                    temperature_c=70.0,
                    power_w=300.5,
                )
            ],
        )
        async with db() as session:
            snapshot = await fleet_metrics.read_snapshot(session)
        assert snapshot.providers_by_state == {ONLINE: 1, OFFLINE: 1}
        model = live.gpus[0].model
        assert snapshot.gpus_by_state == {(model, "free"): 2, (model, OFFLINE): 1}
        assert len(snapshot.gpus) == 2
        collector = fleet_metrics.FleetCollector()
        collector.snapshot = snapshot
        samples = {
            (m.name, s.labels.get("gpu_uuid"), s.labels.get("state")): s.value
            for m in collector.collect()
            for s in m.samples
        }
        uuid = live.gpus[0].uuid
        assert samples[("gpumarket_gpu_utilization_percent", uuid, None)] == 97.0
        assert samples[("gpumarket_gpu_memory_used_bytes", uuid, None)] == 1024 * 2**20
        assert samples[("gpumarket_gpu_power_watts", uuid, None)] == 300.5
        assert samples[("gpumarket_providers", None, OFFLINE)] == 1
        assert samples[("gpumarket_gpus", None, "free")] == 2
        assert samples[("gpumarket_gpus", None, "busy")] == 0
        assert samples[("gpumarket_gpus", None, OFFLINE)] == 1
        assert samples[("gpumarket_gpu_price_per_hour", uuid, None)] == float(
            live.gpus[0].price_per_hour
        )
        # No reading yet for the second GPU: no sample rather than a made-up zero.
        assert ("gpumarket_gpu_utilization_percent", live.gpus[1].uuid, None) not in samples
