"""Admin routes: users and signing keys."""

from fastapi import APIRouter, Depends, Query

from auth_service.schemas import SigningKeyOut, UserOut
from gateway.api import deps
from gateway.clients import ServiceClient
from gateway.security import require_admin

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.get("/users", response_model=list[UserOut])
async def list_users(
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
    auth: ServiceClient = Depends(deps.auth),
) -> list[dict]:
    return await auth.request("GET", "/internal/users", params={"limit": limit, "offset": offset})


@router.post("/users/{user_id}/disable", response_model=UserOut)
async def disable_user(
    user_id: str,
    auth: ServiceClient = Depends(deps.auth),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    """Ends the user's access at once: sessions, API keys and their provider daemons, whose
    machines leave the market. Safe to retry."""
    user = await auth.request("POST", f"/internal/users/{user_id}/disable")
    await registry.request("POST", f"/internal/owners/{user['id']}/suspend")
    return user


@router.post("/users/{user_id}/enable", response_model=UserOut)
async def enable_user(
    user_id: str,
    auth: ServiceClient = Depends(deps.auth),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    """Lets the user log in again and puts their machines back; ended sessions stay ended."""
    user = await auth.request("POST", f"/internal/users/{user_id}/enable")
    await registry.request("POST", f"/internal/owners/{user['id']}/resume")
    return user


@router.post("/signing-keys/rotate", response_model=SigningKeyOut)
async def rotate_signing_key(auth: ServiceClient = Depends(deps.auth)) -> dict:
    """Publishes a new signing key, which signs from activates_at on. Tokens signed by the
    old key stay valid until they expire."""
    return await auth.request("POST", "/internal/signing-keys/rotate")
