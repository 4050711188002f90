"""Answers the gateway's question on every request: is this credential still good, and whose?

Signatures are checked by the gateway with the JWKS; what a signature can't tell (the user
was disabled, the session ended, the key was revoked) is checked here, so a revocation
takes effect on the very next request.
"""

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from auth_service import agents, api_keys
from auth_service.models import AuthSession, User
from auth_service.schemas import AgentOut, AuthenticateRequest, PrincipalOut
from common.errors import Unauthorized
from common.ids import is_uuid
from common.tokens import AGENT_PREFIX, API_KEY_PREFIX


async def authenticate(
    session: AsyncSession, request: AuthenticateRequest
) -> PrincipalOut | AgentOut:
    if request.kind == "session":
        return await _session_principal(session, request.user_id, request.session_id)
    secret = request.secret or ""
    if request.kind == "api_key" and secret.startswith(API_KEY_PREFIX):
        found = await api_keys.resolve(session, secret)
        if found is not None:
            key, user = found
            return PrincipalOut(
                kind="api_key",
                user_id=user.id,
                email=user.email,
                # A key never grants more than its owner has now.
                roles=[r for r in key.roles if r in user.roles],
                api_key_id=key.id,
            )
        raise Unauthorized("invalid or revoked API key")
    if request.kind == "agent" and secret.startswith(AGENT_PREFIX):
        credential = await agents.resolve(session, secret)
        if credential is not None:
            return AgentOut(provider_id=credential.provider_id, owner_id=credential.owner_id)
        raise Unauthorized("invalid or revoked provider credential")
    raise Unauthorized("credential not accepted")


async def _session_principal(
    session: AsyncSession, user_id: str | None, session_id: str | None
) -> PrincipalOut:
    if not (user_id and session_id and is_uuid(user_id) and is_uuid(session_id)):
        raise Unauthorized("token has no session")
    row = (
        await session.execute(
            select(User, AuthSession)
            .join(AuthSession, AuthSession.user_id == User.id)
            .where(User.id == user_id, AuthSession.id == session_id)
        )
    ).first()
    if row is None:
        raise Unauthorized("session ended; log in again")
    user, auth_session = row
    if user.disabled:
        raise Unauthorized("account disabled")
    if auth_session.revoked_at is not None or auth_session.expires_at <= datetime.now(UTC):
        raise Unauthorized("session ended; log in again")
    return PrincipalOut(
        kind="session",
        user_id=user.id,
        email=user.email,
        roles=list(user.roles),
        session_id=auth_session.id,
    )
