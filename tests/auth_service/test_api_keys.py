"""API keys on a real PostgreSQL."""

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import async_sessionmaker

from auth_service import accounts, api_keys, principals
from auth_service.models import ApiKey
from auth_service.schemas import AuthenticateRequest
from common.errors import Forbidden, Unauthorized
from tests.auth_service.factories import SETTINGS, create_user


async def principal(db: async_sessionmaker, secret: str):  # type: ignore[no-untyped-def]
    async with db.begin() as session:
        return await principals.authenticate(
            session, AuthenticateRequest(kind="api_key", secret=secret)
        )


async def test_a_key_is_stored_as_a_digest_and_scoped(db: async_sessionmaker) -> None:
    user = await create_user(db, ["requester", "provider"])
    async with db.begin() as session:
        key, secret = await api_keys.create(session, SETTINGS, user, "ci", ["requester"], None)
    assert secret.startswith("gpm_") and secret not in (key.key_hash, key.prefix)
    assert secret.startswith(key.prefix)
    found = await principal(db, secret)
    assert found.user_id == user.id and found.roles == ["requester"]
    assert found.kind == "api_key" and found.api_key_id == key.id


async def test_a_key_never_grants_a_role_its_user_lacks(db: async_sessionmaker) -> None:
    user = await create_user(db, ["requester"])
    with pytest.raises(Forbidden):
        async with db.begin() as session:
            await api_keys.create(session, SETTINGS, user, "x", ["admin"], None)


async def test_revoked_expired_and_disabled_keys_are_refused(db: async_sessionmaker) -> None:
    user = await create_user(db)
    async with db.begin() as session:
        revoked, revoked_secret = await api_keys.create(session, SETTINGS, user, "a", None, None)
        expired, expired_secret = await api_keys.create(session, SETTINGS, user, "b", None, 1)
        _, live_secret = await api_keys.create(session, SETTINGS, user, "c", None, None)
    async with db.begin() as session:
        await api_keys.revoke(session, user.id, revoked.id)
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == expired.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    for secret in (revoked_secret, expired_secret, "gpm_not-a-key"):
        with pytest.raises(Unauthorized):
            await principal(db, secret)
    await principal(db, live_secret)
    async with db.begin() as session:
        await accounts.set_disabled(session, user.id, True)
    with pytest.raises(Unauthorized):
        await principal(db, live_secret)
