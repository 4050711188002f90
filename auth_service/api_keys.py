"""API keys for scripts and CI: shown once, stored as a digest, scoped to some roles."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from auth_service.credentials import LAST_USED_RESOLUTION, digest, new_secret
from auth_service.models import ApiKey, User
from auth_service.settings import AuthSettings
from common.errors import Conflict, Forbidden, NotFound
from common.tokens import API_KEY_PREFIX


async def create(
    session: AsyncSession,
    settings: AuthSettings,
    user: User,
    name: str,
    roles: list[str] | None,
    expires_in_days: int | None,
) -> tuple[ApiKey, str]:
    """Returns the key's record and its secret, which is never shown again."""
    scope = sorted(set(roles)) if roles else sorted(user.roles)
    missing = [r for r in scope if r not in user.roles]
    if missing:
        raise Forbidden(f"you do not have the role(s) {', '.join(missing)}", field="roles")
    count = await session.scalar(
        select(func.count())
        .select_from(ApiKey)
        .where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
    )
    if (count or 0) >= settings.api_keys_per_user:
        raise Conflict(
            f"at most {settings.api_keys_per_user} live API keys per user; revoke one first"
        )
    secret = new_secret(API_KEY_PREFIX)
    key = ApiKey(
        user_id=user.id,
        name=name,
        prefix=secret[: len(API_KEY_PREFIX) + 6],
        key_hash=digest(secret),
        roles=scope,
        expires_at=datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None,
    )
    session.add(key)
    await session.flush()
    return key, secret


async def list_for(session: AsyncSession, user_id: str) -> list[ApiKey]:
    rows = await session.scalars(
        select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at, ApiKey.id)
    )
    return list(rows)


async def revoke(session: AsyncSession, user_id: str, key_id: str) -> ApiKey:
    key = await session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id))
    if key is None:
        raise NotFound(f"API key {key_id} not found")
    if key.revoked_at is None:
        key.revoked_at = datetime.now(UTC)
        await session.flush()
    return key


async def resolve(session: AsyncSession, secret: str) -> tuple[ApiKey, User] | None:
    """The live key and its enabled owner, or None."""
    row = (
        await session.execute(
            select(ApiKey, User)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.key_hash == digest(secret))
        )
    ).first()
    if row is None:
        return None
    key, user = row
    now = datetime.now(UTC)
    if key.revoked_at is not None or (key.expires_at and key.expires_at <= now) or user.disabled:
        return None
    if key.last_used_at is None or key.last_used_at < now - LAST_USED_RESOLUTION:
        key.last_used_at = now
    return key, user
