"""Admin routes: users, credits, money totals and signing keys."""

from fastapi import APIRouter, Depends, Query
from sqlalchemy.ext.asyncio import async_sessionmaker

from auth_service.schemas import SigningKeyOut, UserOut
from billing import funding, reports
from billing.schemas import CreditOut, CreditRequest, TotalsOut
from common.errors import Invalid
from gateway.api import deps
from gateway.auth_cache import Change
from gateway.clients import ServiceClient, UpstreamError
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
    changed: deps.AuthChanged = Depends(deps.auth_changed),
) -> dict:
    """Ends the user's access at once: sessions, API keys and their provider daemons, whose
    machines leave the market. Safe to retry."""
    user = await auth.request("POST", f"/internal/users/{user_id}/disable")
    await changed(Change(user_id=user["id"]))
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


@router.post("/billing/credits", response_model=CreditOut)
async def add_credits(
    body: CreditRequest,
    auth: ServiceClient = Depends(deps.auth),
    db: async_sessionmaker = Depends(deps.db),
) -> CreditOut:
    """Tops up a user's credits, once per `reference` (a retried request credits once).
    The seam where a payment provider's webhook would come in."""
    try:
        user = await auth.request("GET", f"/internal/users/{body.user_id}")
    except UpstreamError as exc:
        if exc.status_code == 404:
            raise Invalid(f"user {body.user_id} not found", field="user_id") from exc
        raise
    async with db.begin() as session:
        result = await funding.add_credits(
            session, user["id"], body.amount, reference=body.reference, memo=body.memo
        )
    return CreditOut(
        user_id=user["id"],
        amount=body.amount,
        reference=result.reference,
        credited=result.credited,
        balance=result.balance,
    )


@router.get("/billing/totals", response_model=TotalsOut)
async def billing_totals(db: async_sessionmaker = Depends(deps.db)) -> TotalsOut:
    """The whole marketplace's money: credits issued and where they are, revenue, fees,
    GPU-hours sold per model, and whether the ledger balances."""
    async with db() as session:
        return await reports.totals(session)
