"""Providers, offers, heartbeats and liveness. Callers own the transaction."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from common.errors import Conflict, NotFound
from common.gpu_models import canonical_model
from common.messages import Heartbeat
from provider_registry.models import (
    CREDENTIAL_REVOKED,
    DRAINING,
    OFFLINE,
    ONLINE,
    OWNER_DISABLED,
    Gpu,
    Provider,
)
from provider_registry.schemas import GpuOut, Offer, ProviderOut, ProviderRegistration

DEFAULT_PRICE = Decimal("0.50")


async def register_provider(session: AsyncSession, reg: ProviderRegistration) -> Provider:
    """Creates the provider, or refreshes it when the same machine joins again."""
    provider = await session.get(Provider, reg.provider_id, options=[selectinload(Provider.gpus)])
    if provider is None:
        provider = Provider(id=reg.provider_id, owner_id=reg.owner_id, machine_id=reg.machine_id)
        session.add(provider)
    elif provider.owner_id != reg.owner_id or provider.machine_id != reg.machine_id:
        raise Conflict("provider id belongs to another machine", field="provider_id")
    provider.name = reg.name
    provider.region = reg.region
    provider.simulated = reg.simulated
    provider.driver_version = reg.driver_version
    provider.cuda_version = reg.cuda_version
    provider.state = ONLINE
    provider.last_heartbeat_at = datetime.now(UTC)

    prices = {canonical_model(model): price for model, price in reg.prices.items()}
    existing = {g.uuid: g for g in provider.gpus}
    reported = {spec.uuid for spec in reg.gpus}
    # A GPU that holds a job stays until the job ends, even if it vanished from the report.
    provider.gpus = [g for g in provider.gpus if g.uuid in reported or g.reserved_job_id]
    for spec in reg.gpus:
        gpu = existing.get(spec.uuid)
        if gpu is None:
            gpu = Gpu(uuid=spec.uuid)
            provider.gpus.append(gpu)
        gpu.index = spec.index
        gpu.model = canonical_model(spec.model)
        gpu.vram_mb = spec.vram_mb
        gpu.compute_capability = spec.compute_capability
        gpu.price_per_hour = prices.get(gpu.model, DEFAULT_PRICE)
        gpu.simulated = reg.simulated
    await session.flush()
    return provider


def provider_out(p: Provider) -> ProviderOut:
    return ProviderOut(
        id=p.id,
        name=p.name,
        region=p.region,
        state=p.state,
        suspended_reason=p.suspended_reason,
        simulated=p.simulated,
        last_heartbeat_at=p.last_heartbeat_at,
        created_at=p.created_at,
        gpus=[
            GpuOut(
                uuid=g.uuid,
                index=g.index,
                model=g.model,
                vram_mb=g.vram_mb,
                compute_capability=g.compute_capability,
                price_per_gpu_hour=g.price_per_hour,
                simulated=g.simulated,
                busy=g.reserved_job_id is not None,
                utilization_pct=g.utilization_pct,
                memory_used_mb=g.memory_used_mb,
                temperature_c=g.temperature_c,
                power_w=g.power_w,
            )
            for g in p.gpus
        ],
    )


async def list_providers(session: AsyncSession, owner_id: str | None) -> list[ProviderOut]:
    query = select(Provider).options(selectinload(Provider.gpus)).order_by(Provider.created_at)
    if owner_id is not None:
        query = query.where(Provider.owner_id == owner_id)
    return [provider_out(p) for p in (await session.scalars(query)).all()]


async def get_provider(
    session: AsyncSession, provider_id: str, owner_id: str | None
) -> ProviderOut:
    """The provider, if owner_id owns it (None: anyone's); someone else's is not found."""
    query = select(Provider).options(selectinload(Provider.gpus)).where(Provider.id == provider_id)
    if owner_id is not None:
        query = query.where(Provider.owner_id == owner_id)
    provider = await session.scalar(query)
    if provider is None:
        raise NotFound(f"provider {provider_id} not found")
    return provider_out(provider)


async def suspend_owner(session: AsyncSession, owner_id: str) -> int:
    """Takes every machine of a disabled owner off the market; returns how many."""
    result = await session.execute(
        update(Provider)
        .where(Provider.owner_id == owner_id, Provider.suspended_reason.is_(None))
        .values(suspended_reason=OWNER_DISABLED)
    )
    return result.rowcount  # type: ignore[attr-defined]


async def resume_owner(session: AsyncSession, owner_id: str) -> int:
    """Puts back the machines that disabling the owner took off (not revoked ones)."""
    result = await session.execute(
        update(Provider)
        .where(Provider.owner_id == owner_id, Provider.suspended_reason == OWNER_DISABLED)
        .values(suspended_reason=None)
    )
    return result.rowcount  # type: ignore[attr-defined]


async def suspend_revoked(session: AsyncSession, provider_id: str) -> None:
    """A machine whose credential was revoked takes no work again."""
    await session.execute(
        update(Provider)
        .where(Provider.id == provider_id)
        .values(suspended_reason=CREDENTIAL_REVOKED)
    )


async def list_offers(
    session: AsyncSession,
    model: str | None = None,
    min_vram_gb: float | None = None,
    max_price: Decimal | None = None,
    include_simulated: bool = True,
) -> list[Offer]:
    """Free GPUs on online machines, one offer per machine and model, cheapest first."""
    query = (
        select(
            Provider.id,
            Provider.name,
            Provider.region,
            Gpu.model,
            func.min(Gpu.vram_mb),
            func.max(Gpu.price_per_hour),
            func.count(),
            Provider.simulated,
        )
        .join(Gpu, Gpu.provider_id == Provider.id)
        .where(
            Provider.state == ONLINE,
            Provider.suspended_reason.is_(None),
            Gpu.reserved_job_id.is_(None),
        )
        .group_by(Provider.id, Gpu.model)
        .order_by(func.max(Gpu.price_per_hour), Provider.id)
    )
    if model:
        query = query.where(Gpu.model == canonical_model(model))
    if min_vram_gb is not None:
        query = query.where(Gpu.vram_mb >= int(min_vram_gb * 1024))
    if max_price is not None:
        query = query.where(Gpu.price_per_hour <= max_price)
    if not include_simulated:
        query = query.where(Provider.simulated.is_(False))
    rows = (await session.execute(query)).all()
    return [
        Offer(
            provider_id=pid,
            provider_name=name,
            region=region,
            model=m,
            vram_gb=round(vram / 1024, 1),
            price_per_gpu_hour=price,
            free_gpus=free,
            simulated=sim,
        )
        for pid, name, region, m, vram, price, free, sim in rows
    ]


async def ingest_heartbeats(session: AsyncSession, beats: list[Heartbeat]) -> list[str]:
    """Applies a batch of heartbeats in one transaction; returns providers back online.

    Liveness uses the platform's clock, never the daemon's: a machine whose clock runs
    ahead must not look alive for longer, nor one that runs behind look dead.
    """
    if not beats:
        return []
    revived = (
        await session.scalars(
            select(Provider.id).where(
                Provider.id.in_([b.provider_id for b in beats]), Provider.state == OFFLINE
            )
        )
    ).all()
    providers = Provider.__table__
    await session.execute(
        update(providers)
        .where(providers.c.id == bindparam("p_id"))
        .values(last_heartbeat_at=func.now(), state=bindparam("p_state")),
        [{"p_id": b.provider_id, "p_state": DRAINING if b.draining else ONLINE} for b in beats],
    )
    metrics = [
        {
            "p_id": b.provider_id,
            "g_uuid": g.uuid,
            "util": g.utilization_pct,
            "mem": g.memory_used_mb,
            "temp": g.temperature_c,
            "power": g.power_w,
        }
        for b in beats
        for g in b.gpus
    ]
    if metrics:
        gpus = Gpu.__table__
        await session.execute(
            update(gpus)
            .where(gpus.c.provider_id == bindparam("p_id"), gpus.c.uuid == bindparam("g_uuid"))
            .values(
                utilization_pct=bindparam("util"),
                memory_used_mb=bindparam("mem"),
                temperature_c=bindparam("temp"),
                power_w=bindparam("power"),
                metrics_at=func.now(),
            ),
            metrics,
        )
    return list(revived)


async def mark_silent_offline(session: AsyncSession, ttl_s: float) -> list[str]:
    """Providers whose last heartbeat is older than the TTL go offline; returns their ids."""
    cutoff = datetime.now(UTC) - timedelta(seconds=ttl_s)
    result = await session.scalars(
        update(Provider)
        .where(Provider.state != OFFLINE, Provider.last_heartbeat_at < cutoff)
        .values(state=OFFLINE)
        .returning(Provider.id)
    )
    return list(result.all())
