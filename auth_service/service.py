"""Accounts, tokens and join tokens. Functions take the session; callers own the commit."""

import hashlib
import hmac
import secrets
import uuid
from datetime import UTC, datetime, timedelta

from pwdlib import PasswordHash
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from auth_service import keys
from auth_service.models import JoinToken, User
from auth_service.settings import AuthSettings
from common.errors import Conflict, Forbidden, Gone, Invalid, NotFound, Unauthorized
from common.tokens import ACCESS_AUDIENCE, AGENT_AUDIENCE, ISSUER

password_hash = PasswordHash.recommended()
# Verified against when the email is unknown, so a login takes as long either way.
_DUMMY_HASH = password_hash.hash(secrets.token_urlsafe(16))


def _now() -> datetime:
    return datetime.now(UTC)


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def normalize_email(email: str) -> str:
    return email.strip().lower()


async def register(
    session: AsyncSession, settings: AuthSettings, email: str, password: str, role: str
) -> User:
    if len(password) < settings.min_password_length:
        raise Invalid(
            f"must be at least {settings.min_password_length} characters", field="password"
        )
    user = User(
        email=normalize_email(email), password_hash=password_hash.hash(password), roles=[role]
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict("an account with this email already exists", field="email") from exc
    return user


async def authenticate(session: AsyncSession, email: str, password: str) -> User:
    user = await session.scalar(select(User).where(User.email == normalize_email(email)))
    if user is None:
        password_hash.verify(password, _DUMMY_HASH)
        raise Unauthorized("invalid email or password")
    if not password_hash.verify(password, user.password_hash) or user.disabled:
        raise Unauthorized("invalid email or password")
    return user


async def issue_access_token(
    session: AsyncSession, settings: AuthSettings, user: User
) -> tuple[str, int]:
    key = await keys.active_key(session)
    now = _now()
    claims = {
        "iss": ISSUER,
        "aud": ACCESS_AUDIENCE,
        "sub": user.id,
        "email": user.email,
        "roles": user.roles,
        "iat": now,
        "exp": now + timedelta(seconds=settings.access_token_ttl_s),
        "jti": secrets.token_hex(12),
    }
    return keys.sign(key, claims), settings.access_token_ttl_s


async def get_user(session: AsyncSession, user_id: str) -> User:
    user = await session.get(User, user_id)
    if user is None or user.disabled:
        raise NotFound("user not found")
    return user


async def create_join_token(
    session: AsyncSession, settings: AuthSettings, owner_id: str
) -> tuple[str, datetime]:
    owner = await get_user(session, owner_id)
    if "provider" not in owner.roles and "admin" not in owner.roles:
        raise Forbidden("only providers can create join tokens")
    token = "gpmj_" + secrets.token_urlsafe(32)
    expires_at = _now() + timedelta(seconds=settings.join_token_ttl_s)
    session.add(JoinToken(token_hash=_sha256(token), owner_id=owner.id, expires_at=expires_at))
    await session.flush()
    return token, expires_at


async def redeem_join_token(
    session: AsyncSession, settings: AuthSettings, token: str, machine_id: str
) -> tuple[str, str, str, datetime]:
    """Exchanges a join token for a provider identity and a long-lived agent credential.

    A token binds to the first machine that redeems it; until it expires, the same
    machine may redeem it again (a join retried after a network error). Any other machine
    is refused, and so is everyone once it expired: a machine id is no secret, so an old
    token must not mint new credentials forever.
    Returns (provider_id, owner_id, credential, credential_expires_at).
    """
    row = await session.scalar(
        select(JoinToken).where(JoinToken.token_hash == _sha256(token)).with_for_update()
    )
    if row is None:
        raise Unauthorized("invalid join token", field="token")
    if row.machine_id is not None and not hmac.compare_digest(row.machine_id, machine_id):
        raise Conflict("join token already used by another machine", field="token")
    if row.expires_at <= _now():
        raise Gone("join token expired; create a new one", field="token")
    owner = await get_user(session, row.owner_id)
    if row.machine_id is None:
        row.machine_id = machine_id
        row.provider_id = str(uuid.uuid4())
        row.used_at = _now()
    key = await keys.active_key(session)
    expires_at = _now() + timedelta(days=settings.agent_credential_ttl_days)
    credential = keys.sign(
        key,
        {
            "iss": ISSUER,
            "aud": AGENT_AUDIENCE,
            "sub": row.provider_id,
            "owner": owner.id,
            "roles": ["agent"],
            "iat": _now(),
            "exp": expires_at,
            "jti": secrets.token_hex(12),
        },
    )
    await session.flush()
    assert row.provider_id is not None
    return row.provider_id, owner.id, credential, expires_at
