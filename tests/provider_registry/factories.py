import uuid
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from provider_registry import capacity
from provider_registry.capacity import Reservation
from provider_registry.models import ONLINE, Gpu, Provider


async def create_provider(
    session: AsyncSession,
    gpus: int = 2,
    model: str = "RTX 4090",
    vram_mb: int = 24576,
    price: str = "0.50",
    state: str = ONLINE,
    simulated: bool = False,
    region: str | None = None,
    labels: dict[str, str] | None = None,
    compute_capability: str | None = "8.9",
    cuda_version: str | None = "12.4",
    reliability: float = 1.0,
    pcie: tuple[int, int] | None = (4, 16),
    cpu_count: int | None = 16,
    memory_mb: int | None = 65536,
) -> Provider:
    provider_id = str(uuid.uuid4())
    provider = Provider(
        id=provider_id,
        owner_id=str(uuid.uuid4()),
        machine_id=provider_id,
        name="m",
        state=state,
        simulated=simulated,
        region=region,
        labels=labels or {},
        cuda_version=cuda_version,
        reliability=reliability,
        cpu_count=cpu_count,
        memory_mb=memory_mb,
        last_heartbeat_at=datetime.now(UTC),
        gpus=[
            Gpu(
                uuid=f"GPU-{provider_id[:8]}-{i}",
                index=i,
                model=model,
                vram_mb=vram_mb,
                price_per_hour=Decimal(price),
                simulated=simulated,
                compute_capability=compute_capability,
                pcie_gen=pcie[0] if pcie else None,
                pcie_width=pcie[1] if pcie else None,
            )
            for i in range(gpus)
        ],
    )
    session.add(provider)
    await session.flush()
    return provider


async def reserve_any(
    session: AsyncSession, job_id: str, count: int = 1, model: str | None = None
) -> Reservation | None:
    """Reserves `count` GPUs on the cheapest machine where the database allows it: what
    the scheduler's choice comes down to, without its in-memory view."""
    pools = select(Gpu.provider_id, Gpu.model).group_by(Gpu.provider_id, Gpu.model)
    if model is not None:
        pools = pools.where(Gpu.model == model)
    for provider_id, pool_model in (
        await session.execute(pools.order_by(func.max(Gpu.price_per_hour), Gpu.provider_id))
    ).all():
        reservation = await reserve_in_pool(session, job_id, provider_id, pool_model, count)
        if reservation is not None:
            return reservation
    return None


async def reserve_in_pool(
    session: AsyncSession,
    job_id: str,
    provider_id: str,
    model: str,
    count: int,
    max_price_per_hour: Decimal | None = None,
) -> Reservation | None:
    """Reserves the machine's first `count` free healthy GPUs of `model`, read without a
    lock, through the scheduler's own statement (which re-checks them all), or None."""
    uuids = (
        await session.scalars(
            select(Gpu.uuid)
            .where(
                Gpu.provider_id == provider_id,
                Gpu.model == model,
                Gpu.healthy,
                Gpu.reserved_job_id.is_(None),
            )
            .order_by(Gpu.index)
            .limit(count)
        )
    ).all()
    if len(uuids) < count:
        return None
    wanted = capacity.Wanted(job_id, provider_id, model, list(uuids), max_price_per_hour)
    return (await capacity.reserve_exact(session, [wanted])).get(job_id)
