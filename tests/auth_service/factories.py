"""Plain factory functions for auth_service's tables."""

import secrets

from sqlalchemy.ext.asyncio import async_sessionmaker

from auth_service import accounts
from auth_service.models import User
from auth_service.settings import AuthSettings

SETTINGS = AuthSettings(dev_mode=True, login_max_failures=3, login_block_base_s=30)
PASSWORD = "correct-horse-battery"


async def create_user(db: async_sessionmaker, roles: list[str] | None = None) -> User:
    async with db.begin() as session:
        return await accounts.register(
            session,
            SETTINGS,
            f"u-{secrets.token_hex(4)}@example.com",
            PASSWORD,
            roles or ["requester"],
        )
