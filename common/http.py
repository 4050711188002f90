"""What every HTTP service mounts: /healthz, /metrics, request metrics, 4xx error bodies,
request ids and a request body size limit."""

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, Header, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.body_limit import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from common.errors import DomainError
from common.request_context import RequestIdMiddleware

# For FastAPI(telemetry=...): our metrics are Prometheus'. FastAPI's own OpenTelemetry
# otherwise asks the global tracer, meter and logger providers, on every request,
# whether anyone configured them.
NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests served", ["service", "method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds", "HTTP request latency", ["service", "method", "route"]
)

HealthCheck = Callable[[], Awaitable[None]]


def _field_name(loc: tuple | list) -> str:
    # ("body", "resources", "gpus") -> "resources.gpus"; query/path keep their name.
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def _describe(error: dict) -> dict[str, str]:
    if error.get("type") == "json_invalid":
        # loc is ("body", <character position>): the body itself is what is wrong.
        position = error.get("loc", ("body", "?"))[-1]
        detail = error.get("ctx", {}).get("error", "malformed")
        return {"field": "body", "reason": f"invalid JSON at character {position}: {detail}"}
    reason = error.get("msg", "invalid").removeprefix("Value error, ")
    return {"field": _field_name(error.get("loc", ())), "reason": reason}


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [_describe(e) for e in exc.errors()]
    first = errors[0] if errors else {"field": "body", "reason": "invalid"}
    return JSONResponse(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        content={"detail": f"{first['field']}: {first['reason']}", "errors": errors},
    )


async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content=exc.body(), headers=exc.headers())


def metrics_app(registry: CollectorRegistry = REGISTRY) -> ASGIApp:
    """/metrics rendered off the event loop: the registry's fleet gauges run to hundreds of
    thousands of samples, and rendering them must not stall the requests and heartbeats
    this loop serves."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        # ?name[]=x&name[]=y asks for those series only, as prometheus_client's own app does.
        names = parse_qs(scope.get("query_string", b"").decode()).get("name[]")
        target = registry.restricted_registry(names) if names else registry
        body = await asyncio.to_thread(generate_latest, target)
        await Response(body, media_type=CONTENT_TYPE_LATEST)(scope, receive, send)

    return app


def install_common(
    app: FastAPI,
    service: str,
    health: HealthCheck | None = None,
    *,
    max_request_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
) -> None:
    """Adds /healthz, /metrics, per-route metrics, 4xx bodies that name the field, an
    X-Request-ID on every request and a 413 for bodies over `max_request_body_bytes`
    (None: no limit)."""
    # The last middleware added runs first: request id, then metrics, then the body limit,
    # so a 413 is counted and everything below logs with the request id.
    if max_request_body_bytes is not None:
        app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(DomainError, _domain_error)  # type: ignore[arg-type]
    app.mount("/metrics", metrics_app())

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        if health is not None:
            try:
                await health()
            except Exception as exc:
                return JSONResponse({"status": "unhealthy", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    app.add_middleware(RequestMetricsMiddleware, service=service)
    app.add_middleware(RequestIdMiddleware)


class RequestMetricsMiddleware:
    """Requests and latency (to the response's start: an SSE stream counts until its
    headers) per route template and status. Plain ASGI: Starlette's BaseHTTPMiddleware
    runs every request in a task group of its own, a cost each request would pay."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500  # what the caller gets if the app raises before answering

        async def send_observed(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
                HTTP_LATENCY.labels(self.service, scope["method"], _route(scope)).observe(
                    time.perf_counter() - started
                )
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            HTTP_REQUESTS.labels(
                self.service, scope["method"], _route(scope), str(status_code)
            ).inc()


def _route(scope: Scope) -> str:
    # The router records the matched route in the scope: its template, not the raw path.
    return getattr(scope.get("route"), "path", "unmatched")


def internal_auth_dependency(expected_token: str) -> Callable[[str | None], Awaitable[None]]:
    """A dependency that admits only callers holding the services' internal token (async:
    a plain def would run in the thread pool on every internal call)."""

    async def check(x_internal_token: str | None = Header(default=None)) -> None:
        if x_internal_token is None or not hmac.compare_digest(
            x_internal_token.encode(), expected_token.encode()
        ):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "internal token required")

    return check
