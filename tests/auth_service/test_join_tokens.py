"""Join tokens on a real PostgreSQL."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker

from auth_service import service
from auth_service.models import JoinToken
from auth_service.settings import AuthSettings
from common.errors import Conflict, Gone

SETTINGS = AuthSettings(dev_mode=True)


async def provider_token(db: async_sessionmaker) -> str:
    async with db.begin() as session:
        user = await service.register(
            session, SETTINGS, "p@example.com", "a-good-password", "provider"
        )
        token, _ = await service.create_join_token(session, SETTINGS, user.id)
    return token


async def redeem(db: async_sessionmaker, token: str, machine: str):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await service.redeem_join_token(session, SETTINGS, token, machine)


async def test_same_machine_may_retry_until_the_token_expires(db: async_sessionmaker) -> None:
    token = await provider_token(db)
    first = await redeem(db, token, "machine-a")
    again = await redeem(db, token, "machine-a")
    assert again[0] == first[0]  # the same provider identity
    with pytest.raises(Conflict):
        await redeem(db, token, "machine-b")
    async with db.begin() as session:
        await session.execute(
            update(JoinToken).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    # A machine id is no secret: an expired token mints nothing, not even for its machine.
    with pytest.raises(Gone):
        await redeem(db, token, "machine-a")
