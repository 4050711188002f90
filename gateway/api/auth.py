"""Accounts, sessions and API keys, served by auth_service behind the gateway."""

from fastapi import APIRouter, Depends, Request, Response, status

from auth_service.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    LoginRequest,
    LogoutRequest,
    RefreshRequest,
    RegisterRequest,
    TokenOut,
    UserOut,
)
from common.errors import Forbidden
from gateway.api import deps
from gateway.auth_cache import Change
from gateway.clients import ServiceClient, UpstreamError
from gateway.security import Principal, current_principal, require_session

router = APIRouter(tags=["auth"])


async def _per_client_address(request: Request) -> None:
    """Throttles register, login and refresh per client address (see rate_limit_auth_per_ip)."""
    address = request.client.host if request.client else "unknown"
    await request.app.state.limiter.check(
        "auth-ip", address, request.app.state.settings.rate_limit_auth_per_ip
    )


PerAddress = Depends(_per_client_address)


@router.post(
    "/v1/auth/register",
    status_code=status.HTTP_201_CREATED,
    response_model=UserOut,
    dependencies=[PerAddress],
)
async def register(body: RegisterRequest, auth: ServiceClient = Depends(deps.auth)) -> dict:
    """An account with the roles requester, provider, or both."""
    return await auth.request("POST", "/internal/users", json=body.model_dump())


@router.post("/v1/auth/login", response_model=TokenOut, dependencies=[PerAddress])
async def login(body: LoginRequest, auth: ServiceClient = Depends(deps.auth)) -> dict:
    """A short-lived access token and a single-use refresh token."""
    return await auth.request("POST", "/internal/login", json=body.model_dump())


@router.post("/v1/auth/refresh", response_model=TokenOut, dependencies=[PerAddress])
async def refresh(
    body: RefreshRequest,
    auth: ServiceClient = Depends(deps.auth),
    changed: deps.AuthChanged = Depends(deps.auth_changed),
) -> dict:
    """Trades a refresh token for a new pair; the old refresh token is spent. Using a spent
    one again ends the whole session (it was stolen, or copied)."""
    try:
        return await auth.request("POST", "/internal/refresh", json=body.model_dump())
    except UpstreamError as exc:
        ended = exc.body().pop("ended_user_id", None)
        if isinstance(ended, str):
            await changed(Change(user_id=ended))
        raise


@router.post("/v1/auth/logout", status_code=status.HTTP_204_NO_CONTENT)
async def logout(
    body: LogoutRequest | None = None,
    principal: Principal = Depends(require_session),
    auth: ServiceClient = Depends(deps.auth),
    changed: deps.AuthChanged = Depends(deps.auth_changed),
) -> Response:
    """Ends this session (its access and refresh tokens), or every session with
    `everywhere`."""
    await auth.request(
        "POST",
        "/internal/logout",
        json={
            "user_id": principal.id,
            "session_id": principal.session_id,
            "everywhere": bool(body and body.everywhere),
        },
    )
    await changed(Change(user_id=principal.id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/v1/me", response_model=UserOut)
async def me(
    principal: Principal = Depends(current_principal), auth: ServiceClient = Depends(deps.auth)
) -> dict:
    return await auth.request("GET", f"/internal/users/{principal.id}")


@router.post("/v1/api-keys", status_code=status.HTTP_201_CREATED, response_model=ApiKeyCreated)
async def create_api_key(
    body: ApiKeyCreate,
    principal: Principal = Depends(require_session),
    auth: ServiceClient = Depends(deps.auth),
) -> dict:
    """A key for scripts and CI, used as `Authorization: Bearer <key>`. The key is in this
    answer only: it is stored as a digest and can't be shown again."""
    return await auth.request(
        "POST", f"/internal/users/{principal.id}/api-keys", json=body.model_dump(mode="json")
    )


@router.get("/v1/api-keys", response_model=list[ApiKeyOut])
async def list_api_keys(
    principal: Principal = Depends(require_session), auth: ServiceClient = Depends(deps.auth)
) -> list[dict]:
    return await auth.request("GET", f"/internal/users/{principal.id}/api-keys")


@router.delete("/v1/api-keys/{key_id}", response_model=ApiKeyOut)
async def revoke_api_key(
    key_id: str,
    principal: Principal = Depends(current_principal),
    auth: ServiceClient = Depends(deps.auth),
    changed: deps.AuthChanged = Depends(deps.auth_changed),
) -> dict:
    """Revokes one of the caller's keys. A key may revoke itself (`gpumarket logout`)
    but no other: a leaked key can't lock its owner's other scripts out."""
    if principal.kind != "session" and principal.api_key_id != key_id:
        raise Forbidden("log in to do this; an API key can only revoke itself")
    revoked = await auth.request("DELETE", f"/internal/users/{principal.id}/api-keys/{key_id}")
    await changed(Change(user_id=principal.id))
    return revoked
