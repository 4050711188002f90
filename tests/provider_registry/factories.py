import uuid
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from provider_registry.models import ONLINE, Gpu, Provider


async def create_provider(
    session: AsyncSession,
    gpus: int = 2,
    model: str = "RTX 4090",
    vram_mb: int = 24576,
    price: str = "0.50",
    state: str = ONLINE,
    simulated: bool = False,
) -> Provider:
    provider_id = str(uuid.uuid4())
    provider = Provider(
        id=provider_id,
        owner_id=str(uuid.uuid4()),
        machine_id=provider_id,
        name="m",
        state=state,
        simulated=simulated,
        gpus=[
            Gpu(
                uuid=f"GPU-{provider_id[:8]}-{i}",
                index=i,
                model=model,
                vram_mb=vram_mb,
                price_per_hour=Decimal(price),
                simulated=simulated,
            )
            for i in range(gpus)
        ],
    )
    session.add(provider)
    await session.flush()
    return provider
