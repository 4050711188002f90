"""The gateway's short memory of storage usage (a unit test: storage is faked)."""

import asyncio
from typing import Any

from gateway.storage import UsageCache


class FakeStorage:
    def __init__(self, used: int, quota: int = 1000) -> None:
        self.used, self.quota, self.calls = used, quota, 0

    async def request(self, method: str, path: str, **_: Any) -> dict[str, Any]:
        assert (method, path) == ("GET", "/internal/usage")
        self.calls += 1
        return {
            "used_bytes": self.used,
            "quota_bytes": self.quota,
            "files_bytes": self.used,
            "outputs_bytes": 0,
            "logs_bytes": 0,
            "retention_s": 60.0,
        }


async def test_answers_well_under_the_quota_are_kept_for_a_while() -> None:
    cache, storage = UsageCache(ttl_s=60), FakeStorage(used=100)
    for _ in range(5):
        assert (await cache.get(storage, "alice")).used_bytes == 100  # type: ignore[arg-type]
    assert storage.calls == 1
    await cache.get(storage, "bob")  # type: ignore[arg-type]
    assert storage.calls == 2


async def test_near_or_past_the_quota_every_call_asks_afresh() -> None:
    cache, storage = UsageCache(ttl_s=60), FakeStorage(used=950)
    await cache.get(storage, "alice")  # type: ignore[arg-type]
    storage.used = 10  # a delete: seen at once
    assert (await cache.get(storage, "alice")).used_bytes == 10  # type: ignore[arg-type]
    assert storage.calls == 2


async def test_kept_answers_expire() -> None:
    cache, storage = UsageCache(ttl_s=0), FakeStorage(used=1)
    await cache.get(storage, "alice")  # type: ignore[arg-type]
    await cache.get(storage, "alice")  # type: ignore[arg-type]
    assert storage.calls == 2


async def test_a_burst_of_submissions_asks_once() -> None:
    cache, storage = UsageCache(ttl_s=60), FakeStorage(used=100)
    answers = await asyncio.gather(*(cache.get(storage, "alice") for _ in range(40)))  # type: ignore[arg-type]
    assert {a.used_bytes for a in answers} == {100}
    assert storage.calls == 1
