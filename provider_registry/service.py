"""Providers, offers, heartbeats and liveness. Callers own the transaction."""

from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from common.errors import Conflict, Invalid, NotFound
from common.gpu_models import canonical_model
from provider_registry.models import (
    CAPACITY_SEQ,
    CREDENTIAL_REVOKED,
    DRAINING,
    LEFT,
    ONLINE,
    OWNER_DISABLED,
    Gpu,
    Provider,
)
from provider_registry.schemas import GpuOut, ProviderOut, ProviderRegistration

DEFAULT_PRICE = Decimal("0.50")
# The scale of the numeric(12, 6) price column, so an answer reads as the row will.
PRICE_QUANTUM = Decimal("0.000001")


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
    provider.labels = dict(reg.labels)
    provider.simulated = reg.simulated
    provider.driver_version = reg.driver_version
    provider.cuda_version = reg.cuda_version
    provider.cpu_count = reg.cpu_count
    provider.memory_mb = reg.memory_mb
    # A joining daemon is alive now; an owner's drain request survives a re-join.
    provider.state = DRAINING if provider.drain_requested else ONLINE
    provider.left_at = None
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
        gpu.pcie_gen = spec.pcie_gen
        gpu.pcie_width = spec.pcie_width
        gpu.price_per_hour = prices.get(gpu.model, DEFAULT_PRICE)
        gpu.simulated = reg.simulated
    # A GPU gone from the report changes no remaining row: say so to the schedulers.
    provider.capacity_seq = CAPACITY_SEQ.next_value()
    await session.flush()
    return provider


def provider_out(p: Provider) -> ProviderOut:
    return ProviderOut(
        id=p.id,
        name=p.name,
        region=p.region,
        labels=p.labels or {},
        state=p.state,
        drain_requested=p.drain_requested,
        suspended_reason=p.suspended_reason,
        simulated=p.simulated,
        driver_version=p.driver_version,
        cuda_version=p.cuda_version,
        cpu_count=p.cpu_count,
        memory_mb=p.memory_mb,
        reliability=p.reliability,
        uptime=p.uptime,
        last_heartbeat_at=p.last_heartbeat_at,
        created_at=p.created_at,
        gpus=[
            GpuOut(
                uuid=g.uuid,
                index=g.index,
                model=g.model,
                vram_mb=g.vram_mb,
                compute_capability=g.compute_capability,
                pcie_gen=g.pcie_gen,
                pcie_width=g.pcie_width,
                price_per_gpu_hour=g.price_per_hour,
                simulated=g.simulated,
                busy=g.reserved_job_id is not None,
                healthy=g.healthy,
                health_reason=g.health_reason,
                utilization_pct=g.utilization_pct,
                memory_used_mb=g.memory_used_mb,
                temperature_c=g.temperature_c,
                power_w=g.power_w,
                ecc_errors=g.ecc_errors,
                xid_errors=g.xid_errors,
                metrics_at=g.metrics_at,
            )
            for g in p.gpus
        ],
    )


async def list_providers(
    session: AsyncSession, owner_id: str | None, include_left: bool = False
) -> list[ProviderOut]:
    query = select(Provider).options(selectinload(Provider.gpus)).order_by(Provider.created_at)
    if owner_id is not None:
        query = query.where(Provider.owner_id == owner_id)
    if not include_left:
        query = query.where(Provider.state != LEFT)
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


async def _provider_for_update(session: AsyncSession, provider_id: str) -> Provider:
    provider = await session.get(
        Provider, provider_id, options=[selectinload(Provider.gpus)], with_for_update=True
    )
    if provider is None:
        raise NotFound(f"provider {provider_id} not found")
    return provider


async def set_drain(session: AsyncSession, provider_id: str, drain: bool) -> Provider:
    """Drain: running tasks finish, no new one is placed. Resume undoes it. A machine that
    left is drained for good, so a retried `leave` (drain, then leave) still goes through."""
    provider = await _provider_for_update(session, provider_id)
    if provider.state == LEFT:
        if drain:
            return provider
        raise Conflict("the machine left the platform; join it again", field="provider_id")
    provider.drain_requested = drain
    if provider.state in (ONLINE, DRAINING):
        provider.state = DRAINING if drain else ONLINE
    await session.flush()
    return provider


async def leave(session: AsyncSession, provider_id: str) -> Provider:
    """Takes the machine off the platform for good; refused while it still runs tasks,
    so nobody's job is cut short by an owner's exit. Leaving twice is leaving once, so
    a leave retried after its credential revocation failed can finish."""
    provider = await _provider_for_update(session, provider_id)
    if provider.state == LEFT:
        return provider
    busy = sorted({g.reserved_job_id for g in provider.gpus if g.reserved_job_id})
    if busy:
        raise Conflict(
            f"the machine still runs {len(busy)} task(s); drain it and wait for them to end",
            field="provider_id",
        )
    provider.state = LEFT
    provider.drain_requested = True
    provider.left_at = datetime.now(UTC)
    await session.flush()
    return provider


async def set_prices(
    session: AsyncSession, provider_id: str, prices: dict[str, Decimal]
) -> Provider:
    """Sets the price per GPU-hour of the machine's GPUs of each named model, all or
    nothing: a model the machine has no GPU of refuses the whole change. Tasks already
    placed keep the price they were placed at (the job holds its own copy); schedulers
    see the new price through the GPU rows' capacity_seq."""
    provider = await _provider_for_update(session, provider_id)
    if provider.state == LEFT:
        raise Conflict("the machine left the platform; join it again", field="provider_id")
    models = sorted({g.model for g in provider.gpus})
    wanted: dict[str, Decimal] = {}
    for given, price in prices.items():
        model = canonical_model(given)
        field = f"prices.{given}"
        if model not in models:
            raise Invalid(
                f"no GPU of model {given!r} on this machine (models: {', '.join(models)})",
                field=field,
            )
        if model in wanted and wanted[model] != price:
            raise Invalid(f"two different prices for model {model!r}", field=field)
        wanted[model] = price.quantize(PRICE_QUANTUM)
    for gpu in provider.gpus:
        if gpu.model in wanted:
            gpu.price_per_hour = wanted[gpu.model]
    await session.flush()
    return provider
