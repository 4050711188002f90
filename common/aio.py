"""Small asyncio helpers shared by the workers."""

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop where it is installed (uvicorn[standard] brings it, and the
    HTTP services already run on it): a worker's Postgres and NATS traffic costs less
    CPU on its C event loop than on asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Waits until the event is set or `seconds` pass; True if it was set.

    What every worker loop does between rounds: sleep, but wake at once when told to.
    """
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True
