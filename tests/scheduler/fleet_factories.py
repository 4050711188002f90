"""Providers for the fleet sync tests, on top of tests/provider_registry/factories.py."""

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from provider_registry.models import Gpu, Provider
from tests.provider_registry.factories import create_provider


async def add_machine(
    db: async_sessionmaker,
    cpu_count: int | None = 32,
    memory_mb: int | None = 131072,
    suspended_reason: str | None = None,
    **kw: Any,
) -> Provider:
    """A committed provider with its GPUs (create_provider's arguments, and a few more)."""
    async with db.begin() as session:
        provider = await create_provider(session, **kw)
        provider.cpu_count = cpu_count
        provider.memory_mb = memory_mb
        provider.suspended_reason = suspended_reason
    return provider


async def set_provider(db: async_sessionmaker, provider_id: str, **values: Any) -> None:
    async with db.begin() as session:
        await session.execute(update(Provider).where(Provider.id == provider_id).values(**values))


async def set_gpus(db: async_sessionmaker, provider_id: str, *uuids: str, **values: Any) -> None:
    """Updates these GPUs of the provider (all of them when no uuid is named)."""
    query = update(Gpu).where(Gpu.provider_id == provider_id)
    if uuids:
        query = query.where(Gpu.uuid.in_(uuids))
    async with db.begin() as session:
        await session.execute(query.values(**values))


async def capacity_seqs(session: AsyncSession, provider_id: str) -> tuple[int, list[int]]:
    """The provider's capacity_seq and its GPUs', by GPU index."""
    provider = await session.scalar(select(Provider.capacity_seq).where(Provider.id == provider_id))
    gpus = await session.scalars(
        select(Gpu.capacity_seq).where(Gpu.provider_id == provider_id).order_by(Gpu.index)
    )
    return provider, list(gpus)
