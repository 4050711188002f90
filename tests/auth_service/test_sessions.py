"""Sessions, refresh-token rotation and signing-key rotation on a real PostgreSQL."""

import asyncio

import jwt
import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from auth_service import accounts, keys, principals, sessions
from auth_service.schemas import AuthenticateRequest
from auth_service.sessions import TokenPair
from common.errors import Unauthorized
from tests.auth_service.factories import SETTINGS, create_user


async def start(db: async_sessionmaker) -> tuple[str, TokenPair]:
    user = await create_user(db)
    async with db.begin() as session:
        return user.id, await sessions.start(session, SETTINGS, user)


async def refresh(db: async_sessionmaker, token: str) -> TokenPair:
    async with db() as session:
        try:
            return await sessions.refresh(session, SETTINGS, token)
        finally:
            await session.commit()


async def session_ok(db: async_sessionmaker, access_token: str) -> bool:
    claims = jwt.decode(access_token, options={"verify_signature": False})
    request = AuthenticateRequest(kind="session", user_id=claims["sub"], session_id=claims["sid"])
    async with db.begin() as session:
        try:
            await principals.authenticate(session, request)
        except Unauthorized:
            return False
    return True


async def test_refresh_rotates_and_a_reused_token_ends_the_session(
    db: async_sessionmaker,
) -> None:
    _, first = await start(db)
    second = await refresh(db, first.refresh_token)
    assert second.refresh_token != first.refresh_token
    assert await session_ok(db, second.access_token)
    # The old refresh token again: someone holds a copy, so the whole session ends.
    with pytest.raises(Unauthorized):
        await refresh(db, first.refresh_token)
    with pytest.raises(Unauthorized):
        await refresh(db, second.refresh_token)
    assert not await session_ok(db, second.access_token)
    assert not await session_ok(db, first.access_token)


async def test_logout_ends_access_tokens_at_once(db: async_sessionmaker) -> None:
    user_id, pair = await start(db)
    _, other = await start(db)
    claims = jwt.decode(pair.access_token, options={"verify_signature": False})
    async with db.begin() as session:
        await sessions.revoke(session, claims["sid"], user_id, "logout")
    assert not await session_ok(db, pair.access_token)
    assert await session_ok(db, other.access_token)
    with pytest.raises(Unauthorized):
        await refresh(db, pair.refresh_token)


async def test_disabling_a_user_ends_every_session(db: async_sessionmaker) -> None:
    user_id, pair = await start(db)
    async with db.begin() as session:
        await accounts.set_disabled(session, user_id, True)
    assert not await session_ok(db, pair.access_token)
    async with db.begin() as session:
        await accounts.set_disabled(session, user_id, False)
    # Enabling again does not revive the sessions that disabling ended.
    assert not await session_ok(db, pair.access_token)


async def test_rotation_publishes_the_next_key_before_it_signs(db: async_sessionmaker) -> None:
    settings = SETTINGS.model_copy(update={"signing_key_activation_delay_s": 1.0})
    async with db.begin() as session:
        old = await keys.signing_key(session, settings)
        new = await keys.rotate(session, settings)
    async with db.begin() as session:
        published = [k["kid"] for k in (await keys.public_jwks(session, settings))["keys"]]
        assert published == [old.kid, new.kid]
        assert (await keys.signing_key(session, settings)).kid == old.kid
    await asyncio.sleep(1.2)
    async with db.begin() as session:
        assert (await keys.signing_key(session, settings)).kid == new.kid
        # The old public key stays until the tokens it signed have expired.
        published = [k["kid"] for k in (await keys.public_jwks(session, settings))["keys"]]
        assert published == [old.kid, new.kid]
    expired = settings.model_copy(update={"access_token_ttl_s": -61})
    async with db.begin() as session:
        published = [k["kid"] for k in (await keys.public_jwks(session, expired))["keys"]]
        assert published == [new.kid]
