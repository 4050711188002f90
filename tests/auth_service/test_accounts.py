"""Registration rules and the per-email login throttle on a real PostgreSQL."""

import pytest
from sqlalchemy.ext.asyncio import async_sessionmaker

from auth_service import accounts
from common.errors import Conflict, Invalid, TooManyRequests, Unauthorized
from tests.auth_service.factories import PASSWORD, SETTINGS, create_user


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short-pw", "at least 10 characters"),
        ("aaaaabbbbbbb", "5 different characters"),
        ("password123", "most common"),
        ("xx-jonathan-xx", "email"),
    ],
)
def test_weak_passwords_are_refused_naming_the_field(password: str, reason: str) -> None:
    with pytest.raises(Invalid) as err:
        accounts.check_password_strength(SETTINGS, password, "Jonathan@example.com")
    assert err.value.field == "password" and reason in err.value.detail


async def test_emails_are_normalised_and_unique(db: async_sessionmaker) -> None:
    async with db.begin() as session:
        user = await accounts.register(
            session, SETTINGS, " Mixed@Example.COM", PASSWORD, ["provider", "requester"]
        )
    assert user.email == "mixed@example.com" and user.roles == ["requester", "provider"]
    with pytest.raises(Conflict) as err:
        async with db.begin() as session:
            await accounts.register(session, SETTINGS, "mixed@example.com", PASSWORD, ["requester"])
    assert err.value.field == "email"


async def login(db: async_sessionmaker, email: str, password: str) -> None:
    async with db() as session:
        try:
            await accounts.authenticate(session, SETTINGS, email, password)
        finally:
            await session.commit()


async def test_failed_logins_throttle_the_email_even_for_the_right_password(
    db: async_sessionmaker,
) -> None:
    user = await create_user(db)
    for _ in range(SETTINGS.login_max_failures - 1):
        with pytest.raises(Unauthorized):
            await login(db, user.email, "wrong-password-x")
    # The last allowed failure sets the block; from then on even the password is refused.
    with pytest.raises(Unauthorized):
        await login(db, user.email, "wrong-password-x")
    with pytest.raises(TooManyRequests) as err:
        await login(db, user.email, PASSWORD)
    assert 1 <= err.value.retry_after <= SETTINGS.login_block_base_s + 1


async def test_unknown_emails_are_throttled_alike(db: async_sessionmaker) -> None:
    # Otherwise a 429 would tell an attacker which emails have accounts.
    for _ in range(SETTINGS.login_max_failures):
        with pytest.raises(Unauthorized):
            await login(db, "nobody@example.com", "wrong-password-x")
    with pytest.raises(TooManyRequests):
        await login(db, "nobody@example.com", "wrong-password-x")


async def test_a_success_clears_the_failures(db: async_sessionmaker) -> None:
    user = await create_user(db)
    for _ in range(2):
        for _ in range(SETTINGS.login_max_failures - 1):
            with pytest.raises(Unauthorized):
                await login(db, user.email, "wrong-password-x")
        await login(db, user.email, PASSWORD)


async def test_a_disabled_user_cannot_log_in(db: async_sessionmaker) -> None:
    user = await create_user(db)
    async with db.begin() as session:
        await accounts.set_disabled(session, user.id, True)
    with pytest.raises(Unauthorized):
        await login(db, user.email, PASSWORD)
