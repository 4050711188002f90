"""ASGI entry point: uvicorn storage_service.app:create_app --factory"""

import asyncio

from fastapi import Depends, FastAPI

from common.http import internal_auth_dependency
from common.service_app import create_service_app
from storage_service.api import internal
from storage_service.s3 import ObjectStore
from storage_service.settings import StorageSettings


def create_app(settings: StorageSettings | None = None) -> FastAPI:
    settings = settings or StorageSettings()

    async def startup(app: FastAPI) -> None:
        app.state.store = ObjectStore(settings)
        await asyncio.to_thread(app.state.store.ensure_buckets)

    async def s3_reachable(app: FastAPI) -> None:
        await asyncio.to_thread(app.state.store.check)

    app = create_service_app("storage_service", settings, on_startup=startup, health=s3_reachable)
    app.include_router(
        internal, dependencies=[Depends(internal_auth_dependency(settings.internal_token))]
    )
    return app
