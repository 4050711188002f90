"""ASGI entry point: uvicorn provider_registry.app:create_app --factory"""

import asyncio

from fastapi import Depends, FastAPI

from common.http import internal_auth_dependency
from common.nats_client import connect_nats
from common.service_app import create_service_app, nats_connected
from common.streams import ensure_streams
from provider_registry.api import internal
from provider_registry.heartbeats import HeartbeatIngest
from provider_registry.settings import RegistrySettings


def create_app(settings: RegistrySettings | None = None) -> FastAPI:
    settings = settings or RegistrySettings()

    async def startup(app: FastAPI) -> None:
        ingest = HeartbeatIngest(app.state.sessionmaker, settings)
        app.state.nc = await connect_nats(
            settings.nats_url,
            "provider_registry",
            disconnected_cb=ingest.on_disconnected,
            reconnected_cb=ingest.on_reconnected,
        )
        await ensure_streams(app.state.nc.jetstream())
        app.state.stop = asyncio.Event()
        app.state.ingest_task = asyncio.create_task(ingest.run(app.state.nc, app.state.stop))

    async def shutdown(app: FastAPI) -> None:
        app.state.stop.set()
        await app.state.ingest_task
        await app.state.nc.drain()

    app = create_service_app(
        "provider_registry", settings, startup, shutdown, health=nats_connected
    )
    app.include_router(
        internal, dependencies=[Depends(internal_auth_dependency(settings.internal_token))]
    )
    return app
