"""Answers of auth_service's /internal/authenticate, kept a few seconds.

Every request needs one, and asking costs a round trip and a database read in auth_service:
most of the work of a small request. A cached answer is used for at most `ttl_s`.
Revocations made through a gateway (logout, a revoked key or provider credential, a
disabled user) evict the entries they concern at once, on this replica and, over NATS
(`auth.changed`), on every other. Only what no gateway sees happen waits out the TTL: a
session or key reaching its expiry, a session ended by refresh token reuse, a change
made straight in the database.
"""

import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter

from common.aio import Flights
from common.subjects import AUTH_CHANGED

log = logging.getLogger(__name__)

LOOKUPS = Counter("gateway_auth_cache_lookups_total", "Credential checks, by answer", ["result"])
for _result in ("hit", "miss"):
    LOOKUPS.labels(_result)


def cache_key(body: dict[str, Any]) -> str:
    """A session by its ids; a secret by its digest (the cache never holds secrets)."""
    if body.get("kind") == "session":
        return f"session:{body.get('user_id')}:{body.get('session_id')}"
    secret = str(body.get("secret", ""))
    return f"{body.get('kind')}:{hashlib.sha256(secret.encode()).hexdigest()}"


@dataclass(frozen=True)
class Change:
    """Whose credentials changed: a user's (sessions, keys and their machines' daemons) or
    one machine's."""

    user_id: str | None = None
    provider_id: str | None = None

    def concerns(self, found: dict[str, Any]) -> bool:
        if self.user_id is not None and self.user_id in (
            found.get("user_id"),
            found.get("owner_id"),
        ):
            return True
        return self.provider_id is not None and found.get("provider_id") == self.provider_id


class AuthCache:
    def __init__(self, ttl_s: float, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, dict[str, Any]]] = {}
        self._flights: Flights[dict[str, Any]] = Flights()
        # Bumped by every eviction: an answer asked for before it may predate the
        # revocation, so it is neither kept nor shared with requests that came after.
        self._generation = 0

    async def lookup(
        self, key: str, ask: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """The cached answer, or auth_service's (`ask`), asked once however many
        requests want it at the same moment."""
        found = self.get(key)
        if found is not None:
            return found
        generation = self._generation
        found = await self._flights.run(key, ask)
        if generation == self._generation:
            self.put(key, found)
        return found

    def get(self, key: str) -> dict[str, Any] | None:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > time.monotonic():
            LOOKUPS.labels("hit").inc()
            return entry[1]
        if entry is not None:
            del self._entries[key]
        LOOKUPS.labels("miss").inc()
        return None

    def put(self, key: str, found: dict[str, Any]) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._make_room()
        self._entries[key] = (time.monotonic() + self.ttl_s, found)

    def evict(self, change: Change) -> int:
        self._generation += 1
        self._flights.forget()
        gone = [k for k, (_, found) in self._entries.items() if change.concerns(found)]
        for key in gone:
            del self._entries[key]
        return len(gone)

    def _make_room(self) -> None:
        now = time.monotonic()
        self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
        # Still full: the oldest entries go (dicts keep insertion order).
        for key in list(self._entries)[: max(1, len(self._entries) - self.max_entries + 1)]:
            if len(self._entries) < self.max_entries:
                break
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


async def announce(cache: AuthCache, nc: NATS, change: Change) -> None:
    """Evicts here, then tells the other replicas. Core NATS: a replica that misses the
    message (it was disconnected) still drops the entry within the TTL."""
    cache.evict(change)
    try:
        await nc.publish(AUTH_CHANGED, json.dumps(change.__dict__).encode())
    except Exception as exc:
        log.warning("auth change not announced", extra={"error": str(exc)})


async def listen(cache: AuthCache, nc: NATS) -> None:
    async def on_change(msg: Msg) -> None:
        try:
            fields = json.loads(msg.data)
            change = Change(user_id=fields.get("user_id"), provider_id=fields.get("provider_id"))
        except (ValueError, TypeError, AttributeError):
            log.warning("malformed auth change ignored")
            return
        cache.evict(change)

    await nc.subscribe(AUTH_CHANGED, cb=on_change)
