"""Heartbeat ingest on a real PostgreSQL."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import selectinload

from common.messages import GpuMetrics, Heartbeat
from provider_registry import liveness
from provider_registry.heartbeats import HeartbeatIngest
from provider_registry.models import DRAINING, OFFLINE, ONLINE, Provider
from provider_registry.settings import RegistrySettings
from tests.provider_registry.factories import create_provider


def beat(provider: Provider, at: datetime, **kw) -> Heartbeat:  # type: ignore[no-untyped-def]
    return Heartbeat(provider_id=provider.id, at=at, **kw)


async def reload(db: async_sessionmaker, provider_id: str) -> Provider:
    async with db() as session:
        provider = await session.get(Provider, provider_id, options=[selectinload(Provider.gpus)])
        assert provider is not None
        return provider


class TestIngest:
    async def test_liveness_uses_the_platform_clock(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            provider = await create_provider(session, state=OFFLINE)
        an_hour_behind = datetime.now(UTC) - timedelta(hours=1)
        gpu = provider.gpus[0].uuid
        async with db.begin() as session:
            revived = await liveness.ingest_heartbeats(
                session,
                [
                    beat(
                        provider,
                        an_hour_behind,
                        gpus=[GpuMetrics(uuid=gpu, utilization_pct=42.0, temperature_c=61.0)],
                    ),
                ],
            )
        assert revived == [provider.id]
        fresh = await reload(db, provider.id)
        assert fresh.state == ONLINE
        assert fresh.last_heartbeat_at > datetime.now(UTC) - timedelta(minutes=1)
        assert fresh.gpus[0].utilization_pct == 42.0 and fresh.gpus[0].temperature_c == 61.0
        # So a TTL of 30 s does not take it offline on account of its slow clock.
        async with db.begin() as session:
            assert await liveness.mark_silent_offline(session, ttl_s=30) == []

    async def test_a_batch_updates_every_provider_once(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            a = await create_provider(session)
            b = await create_provider(session)
        now = datetime.now(UTC)
        async with db.begin() as session:
            assert (
                await liveness.ingest_heartbeats(
                    session, [beat(a, now), beat(b, now, draining=True)]
                )
                == []
            )
        assert (await reload(db, a.id)).state == ONLINE
        assert (await reload(db, b.id)).state == DRAINING

    async def test_silent_provider_goes_offline(self, db: async_sessionmaker) -> None:
        async with db.begin() as session:
            provider = await create_provider(session)
            provider.last_heartbeat_at = datetime.now(UTC) - timedelta(minutes=5)
        async with db.begin() as session:
            assert await liveness.mark_silent_offline(session, ttl_s=30) == [provider.id]
        assert (await reload(db, provider.id)).state == OFFLINE


class _FailingSessions:
    """The database is down; `during` runs as the flush tries it (a beat arriving then)."""

    def __init__(self, during=lambda: None) -> None:  # type: ignore[no-untyped-def]
        self.during = during

    def begin(self):  # type: ignore[no-untyped-def]
        self.during()
        raise ConnectionError("database down")


def _ingest(sessions: _FailingSessions) -> HeartbeatIngest:
    return HeartbeatIngest(sessions, RegistrySettings(dev_mode=True))  # type: ignore[arg-type]


async def test_a_failed_flush_keeps_its_batch_for_the_next() -> None:
    ingest = _ingest(_FailingSessions())
    ingest.pending = {p: Heartbeat(provider_id=p, at=datetime.now(UTC)) for p in ("p1", "p2")}
    with pytest.raises(ConnectionError):
        await ingest.flush()
    assert set(ingest.pending) == {"p1", "p2"}


async def test_a_beat_arriving_during_a_failed_flush_wins_over_the_kept_one() -> None:
    newer = Heartbeat(provider_id="p1", at=datetime.now(UTC))
    ingest = _ingest(_FailingSessions())
    ingest.sessionmaker = _FailingSessions(lambda: ingest.pending.update(p1=newer))
    ingest.pending = {"p1": Heartbeat(provider_id="p1", at=datetime.now(UTC))}
    with pytest.raises(ConnectionError):
        await ingest.flush()
    assert ingest.pending["p1"] is newer
