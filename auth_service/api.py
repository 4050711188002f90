"""Routes of auth_service: public auth routes and /internal routes for other services."""

from fastapi import APIRouter, Depends, Request, status

from auth_service import keys, service
from auth_service.schemas import (
    AgentCredentialOut,
    JoinTokenCreate,
    JoinTokenOut,
    JoinTokenRedeem,
    LoginRequest,
    RegisterRequest,
    TokenOut,
    UserOut,
)
from auth_service.settings import AuthSettings
from common.service_app import get_sessionmaker

public = APIRouter()
internal = APIRouter(prefix="/internal")
Db = Depends(get_sessionmaker)


def _settings(request: Request) -> AuthSettings:
    return request.app.state.settings


def _user_out(user) -> UserOut:  # type: ignore[no-untyped-def]
    return UserOut(id=user.id, email=user.email, roles=user.roles, created_at=user.created_at)


@public.post("/v1/auth/register", status_code=status.HTTP_201_CREATED, response_model=UserOut)
async def register(body: RegisterRequest, db=Db, settings=Depends(_settings)) -> UserOut:
    async with db.begin() as session:
        user = await service.register(session, settings, body.email, body.password, body.role)
    return _user_out(user)


@public.post("/v1/auth/login", response_model=TokenOut)
async def login(body: LoginRequest, db=Db, settings=Depends(_settings)) -> TokenOut:
    async with db.begin() as session:
        user = await service.authenticate(session, body.email, body.password)
        token, ttl = await service.issue_access_token(session, settings, user)
    return TokenOut(access_token=token, expires_in=ttl)


@public.get("/.well-known/jwks.json")
async def jwks(db=Db) -> dict:
    async with db.begin() as session:
        await keys.active_key(session)
        return await keys.public_jwks(session)


@internal.get("/users/{user_id}", response_model=UserOut)
async def get_user(user_id: str, db=Db) -> UserOut:
    async with db.begin() as session:
        return _user_out(await service.get_user(session, user_id))


@internal.post("/join-tokens", status_code=status.HTTP_201_CREATED, response_model=JoinTokenOut)
async def create_join_token(
    body: JoinTokenCreate, db=Db, settings=Depends(_settings)
) -> JoinTokenOut:
    async with db.begin() as session:
        token, expires_at = await service.create_join_token(session, settings, body.owner_id)
    return JoinTokenOut(token=token, expires_at=expires_at)


@internal.post("/join-tokens/redeem", response_model=AgentCredentialOut)
async def redeem_join_token(
    body: JoinTokenRedeem, db=Db, settings=Depends(_settings)
) -> AgentCredentialOut:
    async with db.begin() as session:
        provider_id, owner_id, credential, expires_at = await service.redeem_join_token(
            session, settings, body.token, body.machine_id
        )
    return AgentCredentialOut(
        provider_id=provider_id,
        owner_id=owner_id,
        credential=credential,
        credential_expires_at=expires_at,
    )
