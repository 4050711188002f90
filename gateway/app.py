"""ASGI entry point: uvicorn gateway.app:create_app --factory"""

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from common.discovery import ServiceResolver, consul_name
from common.nats_client import connect_nats
from common.service_app import create_service_app, nats_connected
from common.streams import ensure_streams
from gateway.api import admin, agent, auth, billing, files, jobs, providers
from gateway.auth_cache import AuthCache, listen
from gateway.clients import ServiceClient
from gateway.ratelimit import RateLimiter
from gateway.security import JwksCache
from gateway.settings import GatewaySettings
from gateway.submissions import SubmissionBatcher


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    async def startup(app: FastAPI) -> None:
        resolver = ServiceResolver()
        app.state.auth, app.state.storage, app.state.registry = (
            ServiceClient(consul_name(name), url, settings.internal_token, resolver=resolver)
            for name, url in (
                ("auth_service", settings.auth_url),
                ("storage_service", settings.storage_url),
                ("provider_registry", settings.registry_url),
            )
        )
        app.state.jwks = JwksCache(
            app.state.auth, settings.jwks_refresh_min_interval_s, settings.jwks_max_age_s
        )
        app.state.limiter = RateLimiter()
        app.state.auth_cache = AuthCache(settings.auth_cache_ttl_s)
        app.state.nc = await connect_nats(settings.nats_url, "gateway")
        await listen(app.state.auth_cache, app.state.nc)
        app.state.js = app.state.nc.jetstream()
        await ensure_streams(app.state.js)
        app.state.submissions = SubmissionBatcher(app.state.sessionmaker, app.state.js, settings)
        app.state.submissions.start()

    async def shutdown(app: FastAPI) -> None:
        await app.state.submissions.stop()
        await app.state.nc.drain()
        for client in (app.state.auth, app.state.storage, app.state.registry):
            await client.aclose()

    app = create_service_app(
        "gateway",
        settings,
        startup,
        shutdown,
        health=nats_connected,
        description="GPU marketplace public API. Authenticate with `Authorization: Bearer`.",
        version="1",
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    for module in (auth, files, jobs, providers, agent, billing, admin):
        app.include_router(module.router)
    return app
