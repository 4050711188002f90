"""Provider join tokens and the daemons' own credentials."""

import hmac
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from auth_service.accounts import active_user
from auth_service.credentials import LAST_USED_RESOLUTION, digest, new_secret
from auth_service.models import AgentCredential, JoinToken, User
from auth_service.settings import AuthSettings
from common.errors import Conflict, Forbidden, Gone, Unauthorized
from common.tokens import AGENT_PREFIX, JOIN_TOKEN_PREFIX


async def create_join_token(
    session: AsyncSession, settings: AuthSettings, owner_id: str
) -> tuple[str, datetime]:
    owner = await active_user(session, owner_id)
    if "provider" not in owner.roles and "admin" not in owner.roles:
        raise Forbidden("only providers can create join tokens")
    token = new_secret(JOIN_TOKEN_PREFIX)
    expires_at = datetime.now(UTC) + timedelta(seconds=settings.join_token_ttl_s)
    session.add(JoinToken(token_hash=digest(token), owner_id=owner.id, expires_at=expires_at))
    await session.flush()
    return token, expires_at


async def redeem_join_token(
    session: AsyncSession, token: str, machine_id: str
) -> tuple[str, str, str]:
    """Exchanges a join token for a provider identity and the daemon's own credential.

    A token binds to the first machine that redeems it; until it expires, the same
    machine may redeem it again (a join retried after a network error), which replaces
    the credential the lost answer carried. Any other machine is refused, and so is
    everyone once it expired: a machine id is no secret.
    Returns (provider_id, owner_id, credential).
    """
    row = await session.scalar(
        select(JoinToken).where(JoinToken.token_hash == digest(token)).with_for_update()
    )
    if row is None:
        raise Unauthorized("invalid join token", field="token")
    if row.machine_id is not None and not hmac.compare_digest(row.machine_id, machine_id):
        raise Conflict("join token already used by another machine", field="token")
    if row.expires_at <= datetime.now(UTC):
        raise Gone("join token expired; create a new one", field="token")
    owner = await active_user(session, row.owner_id)
    if row.machine_id is None:
        row.machine_id = machine_id
        row.provider_id = str(uuid.uuid4())
        row.used_at = datetime.now(UTC)
    assert row.provider_id is not None
    await revoke_credentials(session, row.provider_id)
    credential = new_secret(AGENT_PREFIX)
    session.add(
        AgentCredential(
            provider_id=row.provider_id, owner_id=owner.id, secret_hash=digest(credential)
        )
    )
    await session.flush()
    return row.provider_id, owner.id, credential


async def revoke_credentials(
    session: AsyncSession, provider_id: str, for_good: bool = False
) -> int:
    """Revokes every live credential of a provider; returns how many there were.

    for_good: the owner or an admin cut the machine off, so the join token it came with
    can't bring it back either (a machine id is no secret); it must join with a new one.
    """
    if for_good:
        await session.execute(
            update(JoinToken)
            .where(JoinToken.provider_id == provider_id, JoinToken.expires_at > datetime.now(UTC))
            .values(expires_at=datetime.now(UTC))
        )
    result = await session.execute(
        update(AgentCredential)
        .where(AgentCredential.provider_id == provider_id, AgentCredential.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return result.rowcount  # type: ignore[attr-defined]


OWNER_DISABLED = "the machine's owner account is disabled"


async def resolve(session: AsyncSession, secret: str) -> AgentCredential | None:
    """The live credential, if its owner is enabled; a disabled owner's credential raises
    Unauthorized saying so, because unlike a revoked one it comes back on enable."""
    row = (
        await session.execute(
            select(AgentCredential, User.disabled)
            .join(User, User.id == AgentCredential.owner_id)
            .where(AgentCredential.secret_hash == digest(secret))
        )
    ).first()
    if row is None:
        return None
    credential, owner_disabled = row
    if credential.revoked_at is not None:
        return None
    if owner_disabled:
        raise Unauthorized(OWNER_DISABLED)
    now = datetime.now(UTC)
    if credential.last_used_at is None or credential.last_used_at < now - LAST_USED_RESOLUTION:
        credential.last_used_at = now
    return credential
