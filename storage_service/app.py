"""ASGI entry point: uvicorn storage_service.app:create_app --factory"""

import asyncio
import contextlib
import logging
import math

from fastapi import Depends, FastAPI

from common.http import internal_auth_dependency
from common.service_app import create_service_app
from storage_service import sweeper
from storage_service.api import internal
from storage_service.s3 import ObjectStore
from storage_service.settings import StorageSettings

log = logging.getLogger(__name__)


def _lifecycle_rules(store: ObjectStore) -> dict[str, bool]:
    """Expiry rules on the outputs and logs buckets, in whole days rounded up (never
    earlier than retention); whether the server took them, per bucket."""
    days = max(1, math.ceil(store.settings.retention_s / 86400))
    return {kind: store.set_expiry_rules(kind, days) for kind in ("outputs", "logs")}


def create_app(settings: StorageSettings | None = None) -> FastAPI:
    settings = settings or StorageSettings()

    async def startup(app: FastAPI) -> None:
        app.state.store = store = ObjectStore(settings)
        await asyncio.to_thread(store.ensure_buckets)
        app.state.lifecycle = {}
        if settings.lifecycle_rules:
            app.state.lifecycle = await asyncio.to_thread(_lifecycle_rules, store)
            log.info("S3 lifecycle rules", extra={"accepted": app.state.lifecycle})
        app.state.sweeper = asyncio.create_task(sweeper.run(app.state.sessionmaker, store))

    async def shutdown(app: FastAPI) -> None:
        app.state.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app.state.sweeper

    async def s3_reachable(app: FastAPI) -> None:
        await asyncio.to_thread(app.state.store.check)

    app = create_service_app(
        "storage_service", settings, on_startup=startup, on_shutdown=shutdown, health=s3_reachable
    )
    app.include_router(
        internal, dependencies=[Depends(internal_auth_dependency(settings.internal_token))]
    )
    return app
