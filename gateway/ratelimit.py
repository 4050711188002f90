"""Per-process rate limits on gateway routes, counted in memory."""

import math
import time
from functools import lru_cache
from urllib.parse import quote

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from common.errors import TooManyRequests


@lru_cache(maxsize=256)
def _rules(rule: str) -> list[RateLimitItem]:
    return parse_many(rule)


def _part(identifier: str) -> str:
    # limits joins identifiers with "/"; escaping keeps ("a/b", "c") apart from ("a", "b/c").
    return quote(identifier, safe="")


class RateLimiter:
    """Counts hits per (scope, key) and refuses those over a rule like "10/minute".

    The sliding window counter keeps two counters per key and rule, and the storage drops
    them two windows after their last hit, so memory follows the keys seen lately. (The
    moving window keeps one entry per hit and its in-memory sweep costs a thread hop per
    key on every hit.) The counts live in this process: with several gateway replicas each
    one counts on its own.
    """

    def __init__(self) -> None:
        self._storage = MemoryStorage()
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)

    async def check(self, scope: str, key: str, rule: str) -> None:
        """Counts a hit on `key` under `scope` (e.g. "login", a client address); raises
        TooManyRequests, with the seconds until a hit would pass, when `rule` is exceeded.

        `rule` may hold several limits separated by ";" (a burst and a sustained rate)."""
        identifiers = (_part(scope), _part(key))
        for item in _rules(rule):
            if not await self._limiter.hit(item, *identifiers):
                await self._refuse(item, identifiers)

    async def _refuse(self, item: RateLimitItem, identifiers: tuple[str, str]) -> None:
        stats = await self._limiter.get_window_stats(item, *identifiers)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise TooManyRequests(
            f"too many requests: the limit is {item}; retry in {retry_after} s",
            retry_after=retry_after,
        )
