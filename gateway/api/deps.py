"""Shared route dependencies: the app's clients and connections.

All `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop
per dependency per request for what is an attribute lookup.
"""

from collections.abc import Awaitable, Callable

from fastapi import Request
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from billing.settings import BillingSettings
from common.service_app import get_sessionmaker
from gateway.auth_cache import Change, announce
from gateway.clients import ServiceClient
from gateway.submissions import SubmissionBatcher

# The service database, as every service gets it.
db = get_sessionmaker


async def js(request: Request) -> JetStreamContext:
    return request.app.state.js


async def nc(request: Request) -> NatsClient:
    return request.app.state.nc


async def auth(request: Request) -> ServiceClient:
    return request.app.state.auth


async def storage(request: Request) -> ServiceClient:
    return request.app.state.storage


async def registry(request: Request) -> ServiceClient:
    return request.app.state.registry


async def submissions(request: Request) -> SubmissionBatcher:
    return request.app.state.submissions


async def billing(request: Request) -> BillingSettings:
    return request.app.state.settings


AuthChanged = Callable[[Change], Awaitable[None]]


async def auth_changed(request: Request) -> AuthChanged:
    """Call after a revocation: drops the cached answers it concerns on every replica."""

    async def changed(change: Change) -> None:
        await announce(request.app.state.auth_cache, request.app.state.nc, change)

    return changed
