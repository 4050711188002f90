"""Connecting to NATS the same way in every service: reconnect forever, and count the
connection's errors and disconnects on /metrics (gpumarket_nats_errors_total)."""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from prometheus_client import Counter

log = logging.getLogger(__name__)

NATS_ERRORS = Counter(
    "gpumarket_nats_errors_total", "NATS connection errors and disconnects", ["kind"]
)
# Present at zero from the start, so a rate over them exists before the first error.
for _kind in ("error", "disconnect"):
    NATS_ERRORS.labels(_kind)

Callback = Callable[[], Awaitable[None]]
ErrorCallback = Callable[[Exception], Awaitable[None]]


async def connect_nats(
    url: str,
    name: str,
    *,
    disconnected_cb: Callback | None = None,
    error_cb: ErrorCallback | None = None,
    **options: Any,
) -> NATS:
    async def on_error(exc: Exception) -> None:
        NATS_ERRORS.labels("error").inc()
        if error_cb is not None:
            await error_cb(exc)
        else:
            log.warning("NATS error", extra={"error": str(exc) or type(exc).__name__})

    async def on_disconnected() -> None:
        NATS_ERRORS.labels("disconnect").inc()
        if disconnected_cb is not None:
            await disconnected_cb()

    options.setdefault("max_reconnect_attempts", -1)
    return await nats.connect(
        url, name=name, error_cb=on_error, disconnected_cb=on_disconnected, **options
    )
