"""The event loop the workers run on; apart from common.aio because the provider daemon
imports that, and its image leaves uvloop out."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_on_uvloop(main: Coroutine[Any, Any, T]) -> T:
    """Runs `main` on uvloop (uvicorn[standard] brings it, and the HTTP services already
    run on it): Postgres and NATS traffic costs less CPU on its C event loop. Plain
    asyncio where uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)
