"""Small asyncio helpers shared by the workers."""

import asyncio


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Waits until the event is set or `seconds` pass; True if it was set.

    What every worker loop does between rounds: sleep, but wake at once when told to.
    """
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True
