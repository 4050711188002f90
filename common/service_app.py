"""The shape every HTTP service shares: settings, logging, a DB engine, health, metrics."""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.db import check_database, make_engine, make_sessionmaker
from common.http import install_common
from common.logging import configure_logging
from common.settings import ServiceSettings

Hook = Callable[[FastAPI], Awaitable[None]]


def create_service_app(
    name: str,
    settings: ServiceSettings,
    on_startup: Hook | None = None,
    on_shutdown: Hook | None = None,
    **fastapi_kwargs: object,
) -> FastAPI:
    """A FastAPI app with app.state.settings/engine/sessionmaker, /healthz and /metrics."""
    configure_logging(name, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = make_engine(settings.database_url)
        app.state.sessionmaker = make_sessionmaker(app.state.engine)
        if on_startup is not None:
            await on_startup(app)
        try:
            yield
        finally:
            if on_shutdown is not None:
                await on_shutdown(app)
            await app.state.engine.dispose()

    app = FastAPI(title=name, lifespan=lifespan, **fastapi_kwargs)  # type: ignore[arg-type]
    app.state.settings = settings

    async def health() -> None:
        await check_database(app.state.engine)

    install_common(app, name, health)
    return app
