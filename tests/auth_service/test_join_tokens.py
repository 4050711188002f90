"""Join tokens and agent credentials on a real PostgreSQL."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker

from auth_service import accounts, agents
from auth_service.models import JoinToken
from common.errors import Conflict, Forbidden, Gone, Unauthorized
from tests.auth_service.factories import SETTINGS, create_user


async def provider_token(db: async_sessionmaker) -> tuple[str, str]:
    owner = await create_user(db, ["provider"])
    async with db.begin() as session:
        token, _ = await agents.create_join_token(session, SETTINGS, owner.id)
    return token, owner.id


async def redeem(db: async_sessionmaker, token: str, machine: str) -> tuple[str, str, str]:
    async with db.begin() as session:
        return await agents.redeem_join_token(session, token, machine)


async def resolves(db: async_sessionmaker, credential: str) -> bool:
    async with db.begin() as session:
        return await agents.resolve(session, credential) is not None


async def test_same_machine_may_retry_until_the_token_expires(db: async_sessionmaker) -> None:
    token, _ = await provider_token(db)
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


async def test_a_retried_join_replaces_the_credential(db: async_sessionmaker) -> None:
    token, owner_id = await provider_token(db)
    provider_id, owner, first = await redeem(db, token, "m")
    _, _, second = await redeem(db, token, "m")
    assert owner == owner_id and first != second
    assert first.startswith("gpma_") and not await resolves(db, first)
    assert await resolves(db, second)
    async with db.begin() as session:
        assert await agents.revoke_credentials(session, provider_id) == 1
    assert not await resolves(db, second)


async def test_a_disabled_owner_cuts_its_daemons_off(db: async_sessionmaker) -> None:
    token, owner_id = await provider_token(db)
    _, _, credential = await redeem(db, token, "m")
    async with db.begin() as session:
        await accounts.set_disabled(session, owner_id, True)
    # Said as such, so the daemon waits for its owner instead of giving up for good.
    with pytest.raises(Unauthorized, match="owner account is disabled"):
        await resolves(db, credential)
    async with db.begin() as session:
        await accounts.set_disabled(session, owner_id, False)
    assert await resolves(db, credential)


async def test_only_providers_make_join_tokens(db: async_sessionmaker) -> None:
    requester = await create_user(db, ["requester"])
    with pytest.raises(Forbidden):
        async with db.begin() as session:
            await agents.create_join_token(session, SETTINGS, requester.id)


async def test_a_machine_cut_off_cannot_rejoin_with_its_old_token(db: async_sessionmaker) -> None:
    token, _ = await provider_token(db)
    provider_id, _, _ = await redeem(db, token, "m")
    async with db.begin() as session:
        await agents.revoke_credentials(session, provider_id, for_good=True)
    with pytest.raises(Gone):
        await redeem(db, token, "m")
