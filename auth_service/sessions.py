"""Logins: a session per login, short-lived access JWTs, rotating single-use refresh tokens.

A refresh token used twice means it leaked (or a client raced itself): the whole
session is revoked, so the thief's copy dies with the victim's (OAuth 2.0 BCP, 4.14).
"""

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from auth_service import keys
from auth_service.credentials import digest, new_secret
from auth_service.models import AuthSession, RefreshToken, User
from auth_service.settings import AuthSettings
from common.errors import Unauthorized
from common.tokens import ACCESS_AUDIENCE, ISSUER, REFRESH_PREFIX


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


async def start(session: AsyncSession, settings: AuthSettings, user: User) -> TokenPair:
    auth_session = AuthSession(
        user_id=user.id, expires_at=datetime.now(UTC) + timedelta(seconds=settings.session_ttl_s)
    )
    session.add(auth_session)
    await session.flush()
    return await _issue(session, settings, user, auth_session)


class SessionEnded(Unauthorized):
    """A reused refresh token ended its session. The gateway reads whose (`ended_user_id`,
    kept from the caller) to drop its cached answers for that user's credentials."""

    def __init__(self, detail: str, user_id: str) -> None:
        super().__init__(detail, field="refresh_token")
        self.user_id = user_id

    def body(self) -> dict:
        return {**super().body(), "ended_user_id": self.user_id}


async def refresh(session: AsyncSession, settings: AuthSettings, refresh_token: str) -> TokenPair:
    row = await session.scalar(
        select(RefreshToken)
        .where(RefreshToken.token_hash == digest(refresh_token))
        .with_for_update()
    )
    if row is None:
        raise Unauthorized("invalid refresh token", field="refresh_token")
    auth_session = await session.get(AuthSession, row.session_id, with_for_update=True)
    assert auth_session is not None
    if row.used_at is not None:
        if auth_session.revoked_at is None:
            auth_session.revoked_at = datetime.now(UTC)
            auth_session.revoked_reason = "refresh token reused"
        raise SessionEnded(
            "refresh token already used; the session was ended, log in again",
            auth_session.user_id,
        )
    if auth_session.revoked_at is not None or auth_session.expires_at <= datetime.now(UTC):
        raise Unauthorized("session ended; log in again", field="refresh_token")
    user = await session.get(User, auth_session.user_id)
    if user is None or user.disabled:
        raise Unauthorized("session ended; log in again", field="refresh_token")
    row.used_at = datetime.now(UTC)
    return await _issue(session, settings, user, auth_session)


async def _issue(
    session: AsyncSession, settings: AuthSettings, user: User, auth_session: AuthSession
) -> TokenPair:
    now = datetime.now(UTC)
    key = await keys.signing_key(session, settings)
    # An access token never outlives its session.
    expires_at = min(now + timedelta(seconds=settings.access_token_ttl_s), auth_session.expires_at)
    access = keys.sign(
        key,
        {
            "iss": ISSUER,
            "aud": ACCESS_AUDIENCE,
            "sub": user.id,
            "sid": auth_session.id,
            "email": user.email,
            "roles": user.roles,
            "iat": now,
            "exp": expires_at,
            "jti": secrets.token_hex(12),
        },
    )
    refresh_token = new_secret(REFRESH_PREFIX)
    session.add(
        RefreshToken(
            token_hash=digest(refresh_token),
            session_id=auth_session.id,
            expires_at=auth_session.expires_at,
        )
    )
    await session.flush()
    return TokenPair(
        access_token=access,
        expires_in=max(1, int((expires_at - now).total_seconds())),
        refresh_token=refresh_token,
        refresh_expires_in=max(1, int((auth_session.expires_at - now).total_seconds())),
    )


async def revoke(session: AsyncSession, session_id: str, user_id: str, reason: str) -> None:
    await session.execute(
        update(AuthSession)
        .where(
            AuthSession.id == session_id,
            AuthSession.user_id == user_id,
            AuthSession.revoked_at.is_(None),
        )
        .values(revoked_at=datetime.now(UTC), revoked_reason=reason)
    )


async def revoke_all(session: AsyncSession, user_id: str, reason: str) -> None:
    await session.execute(
        update(AuthSession)
        .where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC), revoked_reason=reason)
    )
