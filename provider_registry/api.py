"""/internal routes of provider_registry, called by the gateway."""

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status

from common import subjects
from common.service_app import get_sessionmaker
from provider_registry import offers, service
from provider_registry.schemas import (
    OfferFilters,
    OfferPage,
    PriceChange,
    ProviderOut,
    ProviderRegistration,
    Suspended,
)

internal = APIRouter(prefix="/internal")
Db = Depends(get_sessionmaker)


@internal.post("/providers", status_code=status.HTTP_201_CREATED, response_model=ProviderOut)
async def register_provider(body: ProviderRegistration, request: Request, db=Db) -> ProviderOut:
    async with db.begin() as session:
        provider = await service.register_provider(session, body)
        out = service.provider_out(provider)
    await request.app.state.nc.publish(subjects.CAPACITY_CHANGED, b"")
    return out


@internal.get("/providers", response_model=list[ProviderOut])
async def list_providers(owner_id: str | None = None, db=Db) -> list[ProviderOut]:
    async with db.begin() as session:
        return await service.list_providers(session, owner_id)


@internal.get("/providers/{provider_id}", response_model=ProviderOut)
async def get_provider(provider_id: str, owner_id: str | None = None, db=Db) -> ProviderOut:
    async with db() as session:
        return await service.get_provider(session, provider_id, owner_id)


@internal.get("/offers", response_model=OfferPage)
async def search_offers(
    request: Request, query: Annotated[OfferFilters, Query()], db=Db
) -> OfferPage:
    async with db() as session:
        return await offers.search_offers(
            session,
            offers.query_from(query, include_simulated=request.app.state.settings.dev_mode),
        )


@internal.post("/providers/{provider_id}/drain", response_model=ProviderOut)
async def drain(provider_id: str, db=Db) -> ProviderOut:
    async with db.begin() as session:
        return service.provider_out(await service.set_drain(session, provider_id, True))


@internal.post("/providers/{provider_id}/resume", response_model=ProviderOut)
async def resume(provider_id: str, request: Request, db=Db) -> ProviderOut:
    async with db.begin() as session:
        out = service.provider_out(await service.set_drain(session, provider_id, False))
    await request.app.state.nc.publish(subjects.CAPACITY_CHANGED, b"")
    return out


@internal.put("/providers/{provider_id}/prices", response_model=ProviderOut)
async def set_prices(provider_id: str, body: PriceChange, request: Request, db=Db) -> ProviderOut:
    async with db.begin() as session:
        provider = await service.set_prices(session, provider_id, body.prices)
        out = service.provider_out(provider)
    # A lower price may bring the machine under a queued job's ceiling.
    await request.app.state.nc.publish(subjects.CAPACITY_CHANGED, b"")
    return out


@internal.post("/providers/{provider_id}/leave", response_model=ProviderOut)
async def leave(provider_id: str, db=Db) -> ProviderOut:
    async with db.begin() as session:
        return service.provider_out(await service.leave(session, provider_id))


@internal.post("/owners/{owner_id}/suspend", response_model=Suspended)
async def suspend_owner(owner_id: str, db=Db) -> Suspended:
    async with db.begin() as session:
        return Suspended(providers=await service.suspend_owner(session, owner_id))


@internal.post("/owners/{owner_id}/resume", response_model=Suspended)
async def resume_owner(owner_id: str, request: Request, db=Db) -> Suspended:
    async with db.begin() as session:
        count = await service.resume_owner(session, owner_id)
    await request.app.state.nc.publish(subjects.CAPACITY_CHANGED, b"")
    return Suspended(providers=count)


@internal.post("/providers/{provider_id}/suspend", status_code=status.HTTP_204_NO_CONTENT)
async def suspend_revoked(provider_id: str, db=Db) -> Response:
    async with db.begin() as session:
        await service.suspend_revoked(session, provider_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
