"""Heartbeats applied in batches, and providers going offline and coming back.

Liveness uses the platform's clock, never the daemon's: a machine whose clock runs
ahead must not look alive for longer, nor one that runs behind look dead.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import bindparam, case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from common.messages import Heartbeat, ProviderLost
from provider_registry.models import (
    DRAINING,
    LEFT,
    OFFLINE,
    ONLINE,
    Gpu,
    Provider,
    ProviderOutage,
)


async def ingest_heartbeats(session: AsyncSession, beats: list[Heartbeat]) -> list[str]:
    """Applies a batch of heartbeats (one per provider) in one transaction; returns the
    providers that were offline and are back."""
    if not beats:
        return []
    # Rows locked in one order (by id) by every writer of many providers, so two
    # transactions can never each hold a row the other waits for.
    beats = sorted(beats, key=lambda b: b.provider_id)
    ids = [b.provider_id for b in beats]
    revived = list(
        (
            await session.scalars(
                select(Provider.id).where(Provider.id.in_(ids), Provider.state == OFFLINE)
            )
        ).all()
    )
    providers = Provider.__table__
    await session.execute(
        update(providers)
        # A machine that left stays gone whatever a stale daemon still sends.
        .where(providers.c.id == bindparam("p_id"), providers.c.state != LEFT)
        .values(
            last_heartbeat_at=func.now(),
            state=case(
                (providers.c.drain_requested | bindparam("p_draining"), DRAINING),
                else_=ONLINE,
            ),
        ),
        [{"p_id": b.provider_id, "p_draining": b.draining} for b in beats],
    )
    metrics = [
        {
            "p_id": b.provider_id,
            "g_uuid": g.uuid,
            "util": g.utilization_pct,
            "mem": g.memory_used_mb,
            "temp": g.temperature_c,
            "power": g.power_w,
            "ecc": g.ecc_errors,
            "xid": g.xid_errors,
            "healthy": g.healthy,
            "reason": (g.health_reason or "")[:256] or None,
        }
        for b in beats
        for g in sorted(b.gpus, key=lambda g: g.uuid)
    ]
    gpus = Gpu.__table__
    # A GPU row a scheduler holds locked (a reservation being committed) is skipped
    # this beat rather than waited for: waiting would hold this batch's other rows
    # locked meanwhile, and the schedulers' SKIP LOCKED would see those as taken.
    unlocked = set(
        (
            await session.execute(
                select(gpus.c.provider_id, gpus.c.uuid)
                .where(gpus.c.provider_id.in_(ids))
                .order_by(gpus.c.id)
                .with_for_update(skip_locked=True)
            )
        ).all()
    )
    metrics = [m for m in metrics if (m["p_id"], m["g_uuid"]) in unlocked]
    if metrics:
        await session.execute(
            update(gpus)
            .where(gpus.c.provider_id == bindparam("p_id"), gpus.c.uuid == bindparam("g_uuid"))
            .values(
                utilization_pct=bindparam("util"),
                memory_used_mb=bindparam("mem"),
                temperature_c=bindparam("temp"),
                power_w=bindparam("power"),
                ecc_errors=bindparam("ecc"),
                xid_errors=bindparam("xid"),
                healthy=bindparam("healthy"),
                health_reason=bindparam("reason"),
                metrics_at=func.now(),
            ),
            metrics,
        )
    if revived:
        await session.execute(
            update(ProviderOutage)
            .where(ProviderOutage.provider_id.in_(revived), ProviderOutage.ended_at.is_(None))
            .values(ended_at=func.now())
        )
    return revived


@dataclass(frozen=True)
class Lost:
    outage_id: int
    event: ProviderLost


async def mark_silent_offline(session: AsyncSession, ttl_s: float) -> list[str]:
    """Providers silent for longer than the TTL go offline, each with an open outage
    that carries the jobs it held; returns their ids."""
    cutoff = datetime.now(UTC) - timedelta(seconds=ttl_s)
    rows = (
        await session.execute(
            update(Provider)
            .where(
                Provider.state.in_([ONLINE, DRAINING]),
                Provider.last_heartbeat_at < cutoff,
            )
            .values(state=OFFLINE)
            .returning(Provider.id, Provider.last_heartbeat_at)
        )
    ).all()
    if not rows:
        return []
    held: dict[str, list[str]] = {}
    for provider_id, job_id in await session.execute(
        select(Gpu.provider_id, Gpu.reserved_job_id)
        .where(Gpu.provider_id.in_([r[0] for r in rows]), Gpu.reserved_job_id.is_not(None))
        .distinct()
        .order_by(Gpu.provider_id, Gpu.reserved_job_id)
    ):
        held.setdefault(provider_id, []).append(job_id)
    session.add_all(
        ProviderOutage(
            provider_id=provider_id,
            # The outage began when the machine fell silent, not when we noticed.
            started_at=last_beat or datetime.now(UTC),
            job_ids=held.get(provider_id, []),
        )
        for provider_id, last_beat in rows
    )
    await session.flush()
    return [r[0] for r in rows]


async def unpublished_losses(session: AsyncSession, limit: int = 500) -> list[Lost]:
    """provider.lost events not yet published (the outbox), oldest first."""
    rows = await session.scalars(
        select(ProviderOutage)
        .where(ProviderOutage.lost_published.is_(False))
        .order_by(ProviderOutage.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [
        Lost(
            outage_id=o.id,
            event=ProviderLost(
                provider_id=o.provider_id,
                at=datetime.now(UTC),
                last_heartbeat_at=o.started_at,
                job_ids=list(o.job_ids),
            ),
        )
        for o in rows.all()
    ]


async def mark_published(session: AsyncSession, outage_ids: list[int]) -> None:
    if outage_ids:
        await session.execute(
            update(ProviderOutage)
            .where(ProviderOutage.id.in_(outage_ids))
            .values(lost_published=True)
        )
