"""The shape every HTTP service shares: settings, logging, a DB engine, health, metrics."""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import async_sessionmaker

from common.db import check_database, make_engine, make_sessionmaker
from common.discovery import Registration, consul_address, consul_name, register_service
from common.heap import settle_after_startup
from common.http import NO_TELEMETRY, install_common
from common.logging import configure_logging
from common.settings import ServiceSettings

Hook = Callable[[FastAPI], Awaitable[None]]
HealthCheck = Callable[[FastAPI], Awaitable[None]]


async def get_sessionmaker(request: Request) -> async_sessionmaker:
    """Route dependency: the sessionmaker of the service's database (async: a plain def
    would run in the thread pool)."""
    return request.app.state.sessionmaker


def create_service_app(
    name: str,
    settings: ServiceSettings,
    on_startup: Hook | None = None,
    on_shutdown: Hook | None = None,
    health: HealthCheck | None = None,
    **fastapi_kwargs: object,
) -> FastAPI:
    """A FastAPI app with app.state.settings/engine/sessionmaker, /healthz and /metrics.

    /healthz checks the database, then `health` (what else the service depends on).
    """
    configure_logging(name, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = make_engine(settings.database_url)
        app.state.sessionmaker = make_sessionmaker(app.state.engine)
        if on_startup is not None:
            await on_startup(app)
        settle_after_startup()
        registration = await register_in_consul(name, settings)
        try:
            yield
        finally:
            if registration is not None:
                await registration.deregister()
            if on_shutdown is not None:
                await on_shutdown(app)
            await app.state.engine.dispose()

    app = FastAPI(title=name, lifespan=lifespan, telemetry=NO_TELEMETRY, **fastapi_kwargs)  # type: ignore[arg-type]
    app.state.settings = settings

    async def check() -> None:
        await check_database(app.state.engine)
        if health is not None:
            await health(app)

    install_common(app, name, check, max_request_body_bytes=settings.max_request_body_bytes)
    return app


async def register_in_consul(
    name: str, settings: ServiceSettings, port: int | None = None
) -> Registration | None:
    """Registers this instance with a /healthz check when CONSUL_HTTP_ADDR is set."""
    if consul_address() is None:
        return None
    port = settings.advertise_port or port
    if port is None:
        raise RuntimeError("CONSUL_HTTP_ADDR is set: GPUMARKET_ADVERTISE_PORT must name our port")
    return await register_service(consul_name(name), port, settings.advertise_host)


async def nats_connected(app: FastAPI) -> None:
    """A /healthz check for services that hold a NATS connection at app.state.nc."""
    if not app.state.nc.is_connected:
        raise RuntimeError("NATS disconnected")
