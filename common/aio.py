"""Small asyncio helpers shared by the workers."""

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Generic, TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Waits until the event is set or `seconds` pass; True if it was set.

    What every worker loop does between rounds: sleep, but wake at once when told to.
    """
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


class Flights(Generic[T]):
    """One call in flight per key: the concurrent misses of a cache share it instead of
    each asking (a burst of requests meeting an expired entry would otherwise send as
    many calls, and open as many connections, as it has requests)."""

    def __init__(self) -> None:
        self._tasks: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, fetch: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(fetch())
            self._tasks[key] = task
            task.add_done_callback(partial(self._landed, key))
        # A caller that goes away leaves the call to the others.
        return await asyncio.shield(task)

    def forget(self) -> None:
        """Calls from now on start afresh instead of joining one already in flight."""
        self._tasks.clear()

    def _landed(self, key: Hashable, task: asyncio.Future[T]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone meanwhile
