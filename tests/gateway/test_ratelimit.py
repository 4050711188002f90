import asyncio
import math
import time

import httpx
import pytest
from fastapi import FastAPI

from common.errors import TooManyRequests
from common.http import install_common
from gateway.clients import ServiceClient
from gateway.ratelimit import RateLimiter

# Hour-long windows: a test never straddles a window boundary, where the sliding window
# counter's estimate may let one extra hit through.
RULE = "3/hour"


async def refused(limiter: RateLimiter, scope: str, key: str, rule: str = RULE) -> int:
    with pytest.raises(TooManyRequests) as caught:
        await limiter.check(scope, key, rule)
    return caught.value.retry_after


class TestRateLimiter:
    async def test_allows_the_rule_then_refuses_until_the_window_ends(self) -> None:
        limiter = RateLimiter()
        for _ in range(3):
            await limiter.check("login", "10.0.0.1", RULE)
        retry_after = await refused(limiter, "login", "10.0.0.1")
        # A fresh key's hits all sit in the current hour: the next one passes when it ends.
        until_next_hour = math.ceil(3600 - time.time() % 3600)
        assert 1 <= retry_after <= 3600
        assert abs(retry_after - until_next_hour) <= 1

    async def test_refusal_names_the_rule(self) -> None:
        limiter = RateLimiter()
        await limiter.check("jobs", "u1", "1/hour")
        with pytest.raises(TooManyRequests) as caught:
            await limiter.check("jobs", "u1", "1/hour")
        assert caught.value.status_code == 429
        assert "1 per 1 hour" in caught.value.detail
        assert caught.value.headers() == {"Retry-After": str(caught.value.retry_after)}

    async def test_keys_are_independent(self) -> None:
        limiter = RateLimiter()
        for _ in range(3):
            await limiter.check("login", "a", RULE)
        await refused(limiter, "login", "a")
        for _ in range(3):
            await limiter.check("login", "b", RULE)

    async def test_scopes_are_independent(self) -> None:
        limiter = RateLimiter()
        for _ in range(3):
            await limiter.check("login", "a", RULE)
        await refused(limiter, "login", "a")
        for _ in range(3):
            await limiter.check("register", "a", RULE)

    async def test_slashes_do_not_merge_scope_and_key(self) -> None:
        limiter = RateLimiter()
        await limiter.check("a/b", "c", "1/hour")
        await limiter.check("a", "b/c", "1/hour")
        await refused(limiter, "a/b", "c", "1/hour")

    async def test_rules_have_their_own_counters(self) -> None:
        limiter = RateLimiter()
        await limiter.check("s", "k", "1/hour")
        await refused(limiter, "s", "k", "1/hour")
        await limiter.check("s", "k", "2/hour")

    async def test_several_rules_each_apply(self) -> None:
        limiter = RateLimiter()
        burst_and_sustained = "2/day;3/hour"  # the second rule is the tighter one here
        for _ in range(2):
            await limiter.check("api", "u1", burst_and_sustained)
        with pytest.raises(TooManyRequests) as caught:
            await limiter.check("api", "u1", burst_and_sustained)
        assert "2 per 1 day" in caught.value.detail
        await limiter.check("api", "u2", "5/day;1/hour")
        with pytest.raises(TooManyRequests) as caught:
            await limiter.check("api", "u2", "5/day;1/hour")
        assert "1 per 1 hour" in caught.value.detail

    async def test_counters_expire(self) -> None:
        limiter = RateLimiter()
        storage = limiter._storage  # the limits MemoryStorage, to see what it holds
        for key in range(50):
            await limiter.check("s", str(key), "5/second")
        assert len(storage.storage) == 50
        # A counter lives two windows; the next hit sweeps the dead ones in the background.
        await asyncio.sleep(2.2)
        await limiter.check("s", "fresh", "5/second")
        for _ in range(100):
            if len(storage.storage) == 1:
                break
            await asyncio.sleep(0.01)
        assert len(storage.storage) == 1 and len(storage.expirations) == 1
        assert "/fresh/" in next(iter(storage.storage))


class TestOverHttp:
    async def test_route_answers_429_with_retry_after(self) -> None:
        limiter = RateLimiter()
        app = FastAPI()
        install_common(app, "gateway")

        @app.post("/login")
        async def login() -> dict:
            await limiter.check("login", "10.0.0.1", "2/hour")
            return {}

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            statuses = [(await client.post("/login")).status_code for _ in range(2)]
            response = await client.post("/login")
        assert statuses == [200, 200]
        assert response.status_code == 429
        assert 1 <= int(response.headers["Retry-After"]) <= 3600
        assert response.json()["detail"].startswith("too many requests")

    async def test_upstream_429_passes_through_with_its_retry_after(self) -> None:
        def upstream(_: httpx.Request) -> httpx.Response:
            return httpx.Response(429, json={"detail": "slow down"}, headers={"Retry-After": "9"})

        service = ServiceClient("auth", "http://auth", "t", transport=httpx.MockTransport(upstream))
        app = FastAPI()
        install_common(app, "gateway")

        @app.get("/relay")
        async def relay() -> dict:
            return await service.request("GET", "/x")

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/relay")
        await service.aclose()
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "9"
        assert response.json() == {"detail": "slow down"}
