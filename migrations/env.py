"""One Alembic history for the whole database; every service's tables are imported here."""

import asyncio
import os

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine

# Imported for their side effect: each registers its tables on the shared metadata.
import auth_service.models  # noqa: F401
import billing.models  # noqa: F401
import provider_registry.models  # noqa: F401
import scheduler.models  # noqa: F401
import storage_service.models  # noqa: F401
from common.db import Base

target_metadata = Base.metadata


def _url() -> str:
    return (
        context.config.get_main_option("sqlalchemy.url")
        or os.environ.get("GPUMARKET_DATABASE_URL")
        or ""
    )


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
