"""Users: registration, password checks with a throttle per email, disabling."""

import secrets
from datetime import UTC, datetime, timedelta

from pwdlib import PasswordHash
from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from auth_service import sessions
from auth_service.credentials import digest
from auth_service.models import LoginThrottle, User
from auth_service.settings import AuthSettings
from common.errors import Conflict, Invalid, NotFound, TooManyRequests, Unauthorized

password_hash = PasswordHash.recommended()
# Verified against when the email is unknown, so a login takes as long either way.
_DUMMY_HASH = password_hash.hash(secrets.token_urlsafe(16))

ROLES = ("requester", "provider", "admin")

# Passwords that meet the length rule and are still the first ones an attacker tries.
_COMMON = {
    "password123", "password1234", "qwertyuiop", "1234567890", "123456789012",
    "iloveyou123", "letmein1234", "administrator", "changeme123", "welcome1234",
    "passw0rd123", "qwerty123456", "abcdefghij", "abc1234567",
}  # fmt: skip


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_password_strength(settings: AuthSettings, password: str, email: str) -> None:
    """Length, variety, and none of the obvious choices; raises Invalid naming `password`."""
    lowered = password.lower()
    local_part = normalize_email(email).partition("@")[0]
    if len(password) < settings.min_password_length:
        reason = f"must be at least {settings.min_password_length} characters"
    elif len(set(password)) < 5:
        reason = "must use at least 5 different characters"
    elif lowered in _COMMON:
        reason = "is one of the most common passwords"
    elif len(local_part) >= 4 and local_part in lowered:
        reason = "must not contain the email address"
    else:
        return
    raise Invalid(reason, field="password")


async def register(
    session: AsyncSession, settings: AuthSettings, email: str, password: str, roles: list[str]
) -> User:
    check_password_strength(settings, password, email)
    user = User(
        email=normalize_email(email),
        password_hash=password_hash.hash(password),
        roles=sorted(set(roles), key=ROLES.index),
    )
    session.add(user)
    try:
        await session.flush()
    except IntegrityError as exc:
        raise Conflict("an account with this email already exists", field="email") from exc
    return user


async def authenticate(
    session: AsyncSession, settings: AuthSettings, email: str, password: str
) -> User:
    """The user, if the password is right; a throttled email answers 429 either way.

    A failure is counted in the session before Unauthorized is raised: the caller must
    commit it even though it answers 401.
    """
    email = normalize_email(email)
    key = digest(email)
    throttle = await session.get(LoginThrottle, key)
    if (
        throttle is not None
        and throttle.blocked_until
        and throttle.blocked_until > datetime.now(UTC)
    ):
        retry_after = (throttle.blocked_until - datetime.now(UTC)).total_seconds()
        raise TooManyRequests(
            "too many failed logins for this email; try again later",
            retry_after=max(1, int(retry_after) + 1),
        )
    user = await session.scalar(select(User).where(User.email == email))
    ok = password_hash.verify(password, user.password_hash if user else _DUMMY_HASH)
    if ok and user is not None and not user.disabled:
        if throttle is not None:
            await session.execute(delete(LoginThrottle).where(LoginThrottle.email_hash == key))
        return user
    await _count_failure(session, settings, key)
    raise Unauthorized("invalid email or password")


async def _count_failure(session: AsyncSession, settings: AuthSettings, key: str) -> None:
    now = datetime.now(UTC)
    failures = await session.scalar(
        insert(LoginThrottle)
        .values(email_hash=key, failures=1, updated_at=now)
        .on_conflict_do_update(
            index_elements=[LoginThrottle.email_hash],
            set_={"failures": LoginThrottle.failures + 1, "updated_at": now},
        )
        .returning(LoginThrottle.failures)
    )
    over = (failures or 0) - settings.login_max_failures
    if over >= 0:
        wait = min(settings.login_block_base_s * 2 ** min(over, 20), settings.login_block_max_s)
        await session.execute(
            update(LoginThrottle)
            .where(LoginThrottle.email_hash == key)
            .values(blocked_until=now + timedelta(seconds=wait))
        )


async def get_user(session: AsyncSession, user_id: str) -> User:
    user = await session.get(User, user_id)
    if user is None:
        raise NotFound("user not found")
    return user


async def user_by_email(session: AsyncSession, email: str) -> User:
    user = await session.scalar(select(User).where(User.email == normalize_email(email)))
    if user is None:
        raise NotFound(f"no user with email {email}", field="email")
    return user


async def active_user(session: AsyncSession, user_id: str) -> User:
    user = await get_user(session, user_id)
    if user.disabled:
        raise NotFound("user not found")
    return user


async def list_users(session: AsyncSession, limit: int, offset: int) -> list[User]:
    rows = await session.scalars(
        select(User).order_by(User.created_at, User.id).limit(limit).offset(offset)
    )
    return list(rows)


async def set_disabled(session: AsyncSession, user_id: str, disabled: bool) -> User:
    """Disabling ends every session now; API keys and daemons are refused while disabled."""
    user = await get_user(session, user_id)
    user.disabled = disabled
    if disabled:
        await sessions.revoke_all(session, user.id, "user disabled")
    await session.flush()
    return user


async def create_or_promote_admin(
    session: AsyncSession, settings: AuthSettings, email: str, password: str
) -> User:
    """For `gpumarket admin create-user`: a new admin, or an existing user made admin."""
    existing = await session.scalar(select(User).where(User.email == normalize_email(email)))
    if existing is None:
        return await register(session, settings, email, password, ["admin"])
    check_password_strength(settings, password, email)
    existing.roles = sorted({*existing.roles, "admin"}, key=ROLES.index)
    existing.password_hash = password_hash.hash(password)
    await session.flush()
    return existing
