"""ASGI entry point: uvicorn auth_service.app:create_app --factory"""

from fastapi import Depends, FastAPI

from auth_service.api import internal, public
from auth_service.settings import AuthSettings
from common.http import internal_auth_dependency
from common.service_app import create_service_app


def create_app(settings: AuthSettings | None = None) -> FastAPI:
    settings = settings or AuthSettings()
    app = create_service_app("auth_service", settings)
    app.include_router(public)
    app.include_router(
        internal, dependencies=[Depends(internal_auth_dependency(settings.internal_token))]
    )
    return app
