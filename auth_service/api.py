"""Routes of auth_service. Only the JWKS is public; the gateway is the front door and
calls the /internal routes with the services' internal token."""

import logging

from fastapi import APIRouter, Depends, Query, Request, Response, status
from sqlalchemy.ext.asyncio import async_sessionmaker

from auth_service import accounts, agents, api_keys, keys, principals, sessions
from auth_service.credentials import digest
from auth_service.models import ApiKey, User
from auth_service.schemas import (
    AgentCredentialOut,
    AgentOut,
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    AuthenticateRequest,
    JoinTokenCreate,
    JoinTokenOut,
    JoinTokenRedeem,
    LoginRequest,
    PrincipalOut,
    RefreshRequest,
    RegisterRequest,
    RevokedOut,
    SessionLogout,
    SigningKeyOut,
    TokenOut,
    UserOut,
)
from auth_service.settings import AuthSettings
from common.errors import DomainError
from common.service_app import get_sessionmaker

log = logging.getLogger(__name__)
public = APIRouter()
internal = APIRouter(prefix="/internal")
Db = Depends(get_sessionmaker)


async def _settings(request: Request) -> AuthSettings:
    return request.app.state.settings


Settings = Depends(_settings)


def _user_out(user: User) -> UserOut:
    return UserOut(
        id=user.id,
        email=user.email,
        roles=user.roles,
        disabled=user.disabled,
        created_at=user.created_at,
    )


def _key_out(key: ApiKey) -> dict:
    return {c: getattr(key, c) for c in ApiKeyOut.model_fields}


@public.get("/.well-known/jwks.json")
async def jwks(db: async_sessionmaker = Db, settings: AuthSettings = Settings) -> dict:
    async with db.begin() as session:
        await keys.signing_key(session, settings)
        return await keys.public_jwks(session, settings)


# Accounts and sessions


@internal.post("/users", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def register(
    body: RegisterRequest, db: async_sessionmaker = Db, settings: AuthSettings = Settings
) -> UserOut:
    async with db.begin() as session:
        user = await accounts.register(session, settings, body.email, body.password, body.roles)
    return _user_out(user)


@internal.post("/login", response_model=TokenOut)
async def login(
    body: LoginRequest, db: async_sessionmaker = Db, settings: AuthSettings = Settings
) -> TokenOut:
    async with db() as session:
        try:
            user = await accounts.authenticate(session, settings, body.email, body.password)
        except DomainError as exc:
            await session.commit()  # the failure counts even though we answer 401
            # Audit trail without the address itself: the digest links attempts on one email.
            log.warning(
                "login refused",
                extra={
                    "email_digest": digest(accounts.normalize_email(body.email))[:16],
                    "status": exc.status_code,
                },
            )
            raise
        pair = await sessions.start(session, settings, user)
        await session.commit()
    return TokenOut(**pair.__dict__)


@internal.post("/refresh", response_model=TokenOut)
async def refresh(
    body: RefreshRequest, db: async_sessionmaker = Db, settings: AuthSettings = Settings
) -> TokenOut:
    async with db() as session:
        try:
            pair = await sessions.refresh(session, settings, body.refresh_token)
        except DomainError as exc:
            await session.commit()  # a reused token ends its session even though we answer 401
            log.warning("refresh refused", extra={"reason": exc.detail})
            raise
        await session.commit()
    return TokenOut(**pair.__dict__)


@internal.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(body: SessionLogout, db: async_sessionmaker = Db) -> Response:
    async with db.begin() as session:
        if body.everywhere or body.session_id is None:
            await sessions.revoke_all(session, body.user_id, "logout everywhere")
        else:
            await sessions.revoke(session, body.session_id, body.user_id, "logout")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@internal.post("/authenticate", response_model=PrincipalOut | AgentOut)
async def authenticate(
    body: AuthenticateRequest, db: async_sessionmaker = Db
) -> PrincipalOut | AgentOut:
    async with db.begin() as session:
        return await principals.authenticate(session, body)


@internal.get("/users", response_model=list[UserOut])
async def list_users(
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
    db: async_sessionmaker = Db,
) -> list[UserOut]:
    async with db() as session:
        return [_user_out(u) for u in await accounts.list_users(session, limit, offset)]


@internal.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: str, db: async_sessionmaker = Db) -> UserOut:
    async with db() as session:
        return _user_out(await accounts.get_user(session, user_id))


@internal.post("/users/{user_id}/disable", response_model=UserOut)
async def disable_user(user_id: str, db: async_sessionmaker = Db) -> UserOut:
    async with db.begin() as session:
        user = await accounts.set_disabled(session, user_id, True)
    log.warning("user disabled", extra={"user_id": user.id})
    return _user_out(user)


@internal.post("/users/{user_id}/enable", response_model=UserOut)
async def enable_user(user_id: str, db: async_sessionmaker = Db) -> UserOut:
    async with db.begin() as session:
        user = await accounts.set_disabled(session, user_id, False)
    log.warning("user enabled", extra={"user_id": user.id})
    return _user_out(user)


# API keys


@internal.post(
    "/users/{user_id}/api-keys", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated
)
async def create_api_key(
    user_id: str,
    body: ApiKeyCreate,
    db: async_sessionmaker = Db,
    settings: AuthSettings = Settings,
) -> ApiKeyCreated:
    async with db.begin() as session:
        user = await accounts.active_user(session, user_id)
        key, secret = await api_keys.create(
            session, settings, user, body.name, body.roles, body.expires_in_days
        )
    log.info("api key created", extra={"user_id": user_id, "api_key_id": key.id})
    return ApiKeyCreated(**_key_out(key), key=secret)


@internal.get("/users/{user_id}/api-keys", response_model=list[ApiKeyOut])
async def list_api_keys(user_id: str, db: async_sessionmaker = Db) -> list[dict]:
    async with db() as session:
        return [_key_out(k) for k in await api_keys.list_for(session, user_id)]


@internal.delete("/users/{user_id}/api-keys/{key_id}", response_model=ApiKeyOut)
async def revoke_api_key(user_id: str, key_id: str, db: async_sessionmaker = Db) -> dict:
    async with db.begin() as session:
        key = await api_keys.revoke(session, user_id, key_id)
    log.info("api key revoked", extra={"user_id": user_id, "api_key_id": key.id})
    return _key_out(key)


# Providers


@internal.post("/join-tokens", status_code=status.HTTP_201_CREATED, response_model=JoinTokenOut)
async def create_join_token(
    body: JoinTokenCreate, db: async_sessionmaker = Db, settings: AuthSettings = Settings
) -> JoinTokenOut:
    async with db.begin() as session:
        token, expires_at = await agents.create_join_token(session, settings, body.owner_id)
    return JoinTokenOut(token=token, expires_at=expires_at)


@internal.post("/join-tokens/redeem", response_model=AgentCredentialOut)
async def redeem_join_token(
    body: JoinTokenRedeem, db: async_sessionmaker = Db
) -> AgentCredentialOut:
    async with db.begin() as session:
        provider_id, owner_id, credential = await agents.redeem_join_token(
            session, body.token, body.machine_id
        )
    return AgentCredentialOut(provider_id=provider_id, owner_id=owner_id, credential=credential)


@internal.post("/providers/{provider_id}/credentials/revoke", response_model=RevokedOut)
async def revoke_agent_credentials(provider_id: str, db: async_sessionmaker = Db) -> RevokedOut:
    async with db.begin() as session:
        revoked = await agents.revoke_credentials(session, provider_id, for_good=True)
    log.warning(
        "provider credentials revoked", extra={"provider_id": provider_id, "count": revoked}
    )
    return RevokedOut(revoked=revoked)


# Signing keys


@internal.post("/signing-keys/rotate", response_model=SigningKeyOut)
async def rotate_signing_key(
    db: async_sessionmaker = Db, settings: AuthSettings = Settings
) -> SigningKeyOut:
    async with db.begin() as session:
        await keys.signing_key(session, settings)
        key = await keys.rotate(session, settings)
    log.warning("signing key rotated", extra={"kid": key.kid, "activates_at": key.activates_at})
    return SigningKeyOut(kid=key.kid, activates_at=key.activates_at)
