from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, status

from auth_service.schemas import JoinTokenOut, RevokedOut
from common.errors import NotFound
from common.ids import is_uuid
from gateway import fleet
from gateway.api import deps
from gateway.auth_cache import Change
from gateway.clients import ServiceClient
from gateway.schemas import JoinRequest, JoinResponse
from gateway.security import Principal, current_principal, require
from provider_registry.schemas import OfferFilters, OfferPage, PriceChange, ProviderOut

router = APIRouter(tags=["providers"])


@router.post(
    "/v1/providers/join-tokens", status_code=status.HTTP_201_CREATED, response_model=JoinTokenOut
)
async def create_join_token(
    principal: Principal = Depends(require("provider")),
    auth: ServiceClient = Depends(deps.auth),
) -> dict:
    """A single-use token for `provider-daemon join --token T` on one machine."""
    return await auth.request("POST", "/internal/join-tokens", json={"owner_id": principal.id})


@router.post("/v1/providers/join", status_code=status.HTTP_201_CREATED, response_model=JoinResponse)
async def join(
    body: JoinRequest,
    request: Request,
    auth: ServiceClient = Depends(deps.auth),
    registry: ServiceClient = Depends(deps.registry),
) -> JoinResponse:
    """Called by provider-daemon: trades a join token for an identity and a credential.

    The token binds to the machine on first use, so a join retried by the same machine
    (after a network error) completes instead of failing.
    """
    identity = await auth.request(
        "POST",
        "/internal/join-tokens/redeem",
        json={"token": body.token, "machine_id": body.machine_id},
    )
    registration = body.model_dump(mode="json", exclude={"token"})
    await registry.request(
        "POST",
        "/internal/providers",
        json={
            **registration,
            "provider_id": identity["provider_id"],
            "owner_id": identity["owner_id"],
        },
    )
    settings = request.app.state.settings
    return JoinResponse(
        provider_id=identity["provider_id"],
        credential=identity["credential"],
        nats_url=settings.public_nats_url or settings.nats_url,
        heartbeat_interval_s=settings.heartbeat_interval_s,
    )


@router.get("/v1/providers", response_model=list[ProviderOut])
async def list_providers(
    principal: Principal = Depends(require("provider")),
    registry: ServiceClient = Depends(deps.registry),
) -> list[dict]:
    """The caller's machines with their GPUs and state (every machine for an admin)."""
    return await registry.request("GET", "/internal/providers", params=principal.owner_params())


@router.get("/v1/providers/{provider_id}", response_model=ProviderOut)
async def get_provider(
    provider_id: str,
    principal: Principal = Depends(require("provider")),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    return await _owned_provider(registry, provider_id, principal)


@router.post("/v1/providers/{provider_id}/credentials/revoke", response_model=RevokedOut)
async def revoke_provider_credential(
    provider_id: str,
    principal: Principal = Depends(require("provider")),
    auth: ServiceClient = Depends(deps.auth),
    registry: ServiceClient = Depends(deps.registry),
    changed: deps.AuthChanged = Depends(deps.auth_changed),
) -> dict:
    """Cuts the machine's daemon off at once (a stolen machine, a leaked config file) and
    takes it off the market. The machine joins again with a new join token."""
    await _owned_provider(registry, provider_id, principal)
    revoked = await auth.request("POST", f"/internal/providers/{provider_id}/credentials/revoke")
    await changed(Change(provider_id=provider_id))
    await registry.request("POST", f"/internal/providers/{provider_id}/suspend")
    return revoked


async def _owned_provider(registry: ServiceClient, provider_id: str, principal: Principal) -> dict:
    """The machine if the principal owns it (or is an admin); anyone else's is a 404."""
    if not is_uuid(provider_id):
        raise NotFound(f"provider {provider_id} not found")
    return await registry.request(
        "GET", f"/internal/providers/{provider_id}", params=principal.owner_params()
    )


@router.post("/v1/providers/{provider_id}/drain", response_model=ProviderOut)
async def drain_provider(
    provider_id: str,
    principal: Principal = Depends(require("provider")),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    """Running tasks finish; no new task is placed on the machine until resume."""
    await _owned_provider(registry, provider_id, principal)
    return await fleet.set_drain(registry, provider_id, True)


@router.post("/v1/providers/{provider_id}/resume", response_model=ProviderOut)
async def resume_provider(
    provider_id: str,
    principal: Principal = Depends(require("provider")),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    await _owned_provider(registry, provider_id, principal)
    return await fleet.set_drain(registry, provider_id, False)


@router.put("/v1/providers/{provider_id}/prices", response_model=ProviderOut)
async def set_provider_prices(
    provider_id: str,
    body: PriceChange,
    principal: Principal = Depends(require("provider")),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    """New prices per GPU-hour by model, `{"prices": {"RTX 4090": 0.45}}`, all or nothing
    (a model the machine lacks is a 422). Tasks already placed keep their price."""
    await _owned_provider(registry, provider_id, principal)
    return await fleet.set_prices(registry, provider_id, body)


@router.get("/v1/offers", response_model=OfferPage)
async def search_offers(
    filters: Annotated[OfferFilters, Query()],
    _: Principal = Depends(current_principal),
    registry: ServiceClient = Depends(deps.registry),
) -> dict:
    """The market: free GPUs by machine and model, filtered, sorted (cheapest first by
    default) and paged. `?model=H100&min_gpus=4&min_reliability=0.95&sort=-reliability`"""
    return await registry.request(
        "GET", "/internal/offers", params=filters.model_dump(mode="json", exclude_defaults=True)
    )
