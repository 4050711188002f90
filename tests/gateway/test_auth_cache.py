"""Credential answers kept a few seconds by each gateway replica, and revocations that
still apply at once on every replica."""

import asyncio
import hashlib
import time
from collections.abc import Iterator

import httpx
import pytest

from common.errors import Unauthorized
from gateway.auth_cache import AuthCache, Change, cache_key
from gpumarket.client import Client
from gpumarket.localstack.process import free_port, spawn, stop_process, wait_until
from gpumarket.platform import LocalPlatform, service_argv
from tests.fixtures.platform import new_user

SESSION = {"user_id": "u1", "roles": ["requester"], "email": "a@example.com", "kind": "session"}
KEY = {**SESSION, "kind": "api_key", "api_key_id": "k1"}
AGENT = {"provider_id": "p1", "owner_id": "u1"}


class TestAuthCache:
    def test_answers_live_for_the_ttl(self, monkeypatch: pytest.MonkeyPatch) -> None:
        now = [100.0]
        monkeypatch.setattr(time, "monotonic", lambda: now[0])
        cache = AuthCache(ttl_s=10)
        cache.put("a", SESSION)
        assert cache.get("a") == SESSION
        now[0] += 10.5
        assert cache.get("a") is None and len(cache) == 0

    def test_a_users_change_evicts_sessions_keys_and_their_machines(self) -> None:
        cache = AuthCache(ttl_s=60)
        cache.put("s", SESSION)
        cache.put("k", KEY)
        cache.put("a", AGENT)
        cache.put("other", {**SESSION, "user_id": "u2"})
        assert cache.evict(Change(user_id="u1")) == 3
        assert cache.get("other") is not None and cache.get("s") is None

    def test_a_machines_change_evicts_only_its_credential(self) -> None:
        cache = AuthCache(ttl_s=60)
        cache.put("a", AGENT)
        cache.put("b", {**AGENT, "provider_id": "p2"})
        cache.put("s", SESSION)
        assert cache.evict(Change(provider_id="p1")) == 1
        assert cache.get("b") is not None and cache.get("s") is not None

    def test_bounded(self) -> None:
        cache = AuthCache(ttl_s=60, max_entries=3)
        for n in range(5):
            cache.put(str(n), SESSION)
        assert len(cache) == 3 and cache.get("4") is not None and cache.get("0") is None

    def test_ttl_zero_keeps_nothing(self) -> None:
        cache = AuthCache(ttl_s=0)
        cache.put("a", SESSION)
        assert cache.get("a") is None

    def test_keys_hold_no_secret(self) -> None:
        key = cache_key({"kind": "api_key", "secret": "gpm_s3cret"})
        assert "s3cret" not in key
        assert key == "api_key:" + hashlib.sha256(b"gpm_s3cret").hexdigest()
        session = {"kind": "session", "user_id": "u", "session_id": "s"}
        assert cache_key(session) == "session:u:s"


class TestLookupsInFlight:
    """A burst of requests meeting an expired entry asks auth_service once."""

    async def test_concurrent_misses_share_one_call(self) -> None:
        cache, calls, release = AuthCache(ttl_s=60), [], asyncio.Event()

        async def ask() -> dict:
            calls.append(1)
            await release.wait()
            return SESSION

        waiting = [asyncio.create_task(cache.lookup("s", ask)) for _ in range(50)]
        await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.gather(*waiting) == [SESSION] * 50
        assert len(calls) == 1
        assert await cache.lookup("s", ask) == SESSION and len(calls) == 1

    async def test_a_failure_reaches_every_waiter_and_is_not_kept(self) -> None:
        cache, calls = AuthCache(ttl_s=60), []

        async def refuse() -> dict:
            calls.append(1)
            await asyncio.sleep(0.01)
            raise Unauthorized("session ended")

        answers = await asyncio.gather(
            *(cache.lookup("s", refuse) for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(a, Unauthorized) for a in answers) and len(calls) == 1
        assert cache.get("s") is None

    async def test_an_answer_asked_before_a_revocation_is_not_kept_or_shared(self) -> None:
        cache, release = AuthCache(ttl_s=60), asyncio.Event()
        answers = iter([SESSION, {**SESSION, "roles": []}])

        async def ask() -> dict:
            await release.wait()
            return next(answers)

        before = asyncio.create_task(cache.lookup("s", ask))
        await asyncio.sleep(0.01)
        cache.evict(Change(user_id="u1"))
        # A request after the revocation asks afresh instead of joining the old call.
        after = asyncio.create_task(cache.lookup("s", ask))
        await asyncio.sleep(0.01)
        release.set()
        assert await before == SESSION
        assert (await after)["roles"] == []
        assert cache.get("s") == {**SESSION, "roles": []}


@pytest.fixture(scope="module")
def second_gateway(platform: LocalPlatform) -> Iterator[str]:
    """Another replica of the gateway beside the platform's, with the same settings."""
    port = free_port()
    proc = spawn(
        "gateway-2",
        service_argv("gateway", port),
        platform.log_dir / "gateway-2.log",
        env=platform.service_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "gateway-2", proc)
        yield url
    finally:
        stop_process(proc)


def status_on(url: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{url}/v1/me", headers=headers, timeout=10).status_code


def refused_soon(url: str, token: str) -> bool:
    # Core NATS carries the change in milliseconds; allow a scheduling hiccup.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        if status_on(url, token) == 401:
            return True
        time.sleep(0.02)
    return False


class TestRevocationsReachEveryReplica:
    def test_logout(self, platform: LocalPlatform, second_gateway: str) -> None:
        user = new_user(platform, credits=0)
        token = user.token
        assert token is not None
        assert status_on(second_gateway, token) == 200  # now cached there
        assert status_on(platform.gateway_url, token) == 200
        user.logout()
        assert status_on(platform.gateway_url, token) == 401
        assert refused_soon(second_gateway, token)

    def test_a_revoked_api_key(self, platform: LocalPlatform, second_gateway: str) -> None:
        user = new_user(platform, credits=0)
        key = user.create_api_key("ci")
        assert status_on(second_gateway, key.key) == 200
        user.revoke_api_key(key.id)
        assert status_on(platform.gateway_url, key.key) == 401
        assert refused_soon(second_gateway, key.key)

    def test_a_disabled_user(
        self, platform: LocalPlatform, second_gateway: str, admin: Client
    ) -> None:
        user = new_user(platform, credits=0)
        token = user.token
        assert token is not None and status_on(second_gateway, token) == 200
        admin.request("POST", f"/v1/admin/users/{user.me().id}/disable")
        assert refused_soon(second_gateway, token)

    def test_a_reused_refresh_token(self, platform: LocalPlatform, second_gateway: str) -> None:
        user = new_user(platform, credits=0)
        spent = user.refresh_token
        user.refresh()
        token = user.token
        assert spent is not None and token is not None
        assert status_on(second_gateway, token) == 200
        reused = httpx.post(
            f"{platform.gateway_url}/v1/auth/refresh", json={"refresh_token": spent}, timeout=10
        )
        assert reused.status_code == 401
        assert "ended_user_id" not in reused.json()  # internal: whose cache entries to drop
        assert refused_soon(second_gateway, token)
