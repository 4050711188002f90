"""The gateway's token check: a verified token is kept until it expires or the keys
change, and nothing that would fail verification passes through the kept answers.

Unit tests: auth_service's JWKS endpoint is a fake that counts its calls; the tokens are
real Ed25519 JWTs signed the way auth_service signs them."""

import asyncio
import time
from datetime import UTC, datetime

import jwt
import pytest

from auth_service.keys import _new_key, sign
from common.errors import Unauthorized
from common.tokens import ACCESS_AUDIENCE, ISSUER
from gateway import security
from gateway.security import JwksCache


class FakeAuth:
    def __init__(self, *keys) -> None:  # type: ignore[no-untyped-def]
        self.keys = list(keys)
        self.fetches = 0

    async def request(self, method: str, path: str) -> dict:
        assert (method, path) == ("GET", "/.well-known/jwks.json")
        self.fetches += 1
        return {"keys": [k.public_jwk for k in self.keys]}


def token(key, subject: str = "user-1", ttl_s: float = 600, audience: str = ACCESS_AUDIENCE) -> str:  # type: ignore[no-untyped-def]
    now = int(time.time())
    claims = {"sub": subject, "iss": ISSUER, "aud": audience, "iat": now, "exp": now + ttl_s}
    return sign(key, claims)


@pytest.fixture
def key():  # type: ignore[no-untyped-def]
    return _new_key(datetime.now(UTC))


def counting_decode(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every signature check the cache makes."""
    checked: list[str] = []
    real = jwt.decode

    def decode(token: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        checked.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(security.jwt, "decode", decode)
    return checked


async def test_a_token_is_verified_once_then_kept(key, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    checked = counting_decode(monkeypatch)
    cache = JwksCache(FakeAuth(key), min_interval_s=1, max_age_s=300)
    access = token(key)
    for _ in range(5):
        assert (await cache.verify(access, ACCESS_AUDIENCE))["sub"] == "user-1"
    assert checked == [access]


async def test_a_tampered_copy_of_a_kept_token_is_refused(key) -> None:  # type: ignore[no-untyped-def]
    cache = JwksCache(FakeAuth(key), min_interval_s=1, max_age_s=300)
    access = token(key)
    await cache.verify(access, ACCESS_AUDIENCE)
    head, payload, signature = access.split(".")
    forged_payload = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b"user-1", b"admin-")
    ).decode()
    with pytest.raises(Unauthorized, match="invalid token"):
        await cache.verify(f"{head}.{forged_payload}.{signature}", ACCESS_AUDIENCE)
    flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BA")
    with pytest.raises(Unauthorized):
        await cache.verify(f"{head}.{payload}.{flipped}", ACCESS_AUDIENCE)


async def test_a_kept_token_expires_on_time(key, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cache = JwksCache(FakeAuth(key), min_interval_s=1, max_age_s=300)
    access = token(key, ttl_s=60)
    await cache.verify(access, ACCESS_AUDIENCE)
    later = time.time() + 61
    monkeypatch.setattr(security.time, "time", lambda: later)
    monkeypatch.setattr(jwt.api_jwt, "datetime", _FrozenDatetime(later), raising=False)
    with pytest.raises(Unauthorized, match="expired"):
        await cache.verify(access, ACCESS_AUDIENCE)


class _FrozenDatetime:
    """PyJWT reads the clock through datetime.now(tz=timezone.utc)."""

    def __init__(self, at: float) -> None:
        self.at = at

    def now(self, tz=None):  # type: ignore[no-untyped-def]
        return datetime.fromtimestamp(self.at, tz)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(datetime, name)


async def test_a_withdrawn_key_takes_its_kept_tokens_with_it(key) -> None:  # type: ignore[no-untyped-def]
    auth = FakeAuth(key)
    cache = JwksCache(auth, min_interval_s=0, max_age_s=300)
    access = token(key)
    await cache.verify(access, ACCESS_AUDIENCE)
    # The keys are fetched again (a new key is announced) without the old one.
    newer = _new_key(datetime.now(UTC))
    auth.keys = [newer]
    await cache.verify(token(newer), ACCESS_AUDIENCE)
    assert auth.fetches == 2
    with pytest.raises(Unauthorized, match="unknown key"):
        await cache.verify(access, ACCESS_AUDIENCE)


async def kept_then_stale(auth: FakeAuth, key) -> tuple[JwksCache, str]:  # type: ignore[no-untyped-def]
    """A cache that verified and kept a token, and whose keys have since aged out."""
    cache = JwksCache(auth, min_interval_s=1, max_age_s=300)
    access = token(key)
    await cache.verify(access, ACCESS_AUDIENCE)
    cache.fetched_at -= 301
    return cache, access


async def test_keys_older_than_their_age_are_fetched_before_a_kept_answer(key) -> None:  # type: ignore[no-untyped-def]
    auth = FakeAuth(key)
    cache, access = await kept_then_stale(auth, key)
    auth.keys = []
    with pytest.raises(Unauthorized, match="unknown key"):
        await cache.verify(access, ACCESS_AUDIENCE)


class SlowAuth(FakeAuth):
    async def request(self, method: str, path: str) -> dict:
        await asyncio.sleep(0.05)
        return await super().request(method, path)


async def test_keys_gone_stale_are_fetched_once_for_every_request_in_flight(key) -> None:  # type: ignore[no-untyped-def]
    auth = SlowAuth(key)
    cache, access = await kept_then_stale(auth, key)
    # 128 connections' requests meet the stale keys together.
    claims = await asyncio.gather(*(cache.verify(access, ACCESS_AUDIENCE) for _ in range(128)))
    assert {c["sub"] for c in claims} == {"user-1"}
    assert auth.fetches == 2


async def test_an_answer_is_kept_per_audience(key) -> None:  # type: ignore[no-untyped-def]
    cache = JwksCache(FakeAuth(key), min_interval_s=1, max_age_s=300)
    access = token(key)
    await cache.verify(access, ACCESS_AUDIENCE)
    with pytest.raises(Unauthorized, match="invalid token"):
        await cache.verify(access, "gpumarket-refresh")


async def test_the_cache_is_bounded(key, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    checked = counting_decode(monkeypatch)
    cache = JwksCache(FakeAuth(key), min_interval_s=1, max_age_s=300, verified_max=2)
    first, second, third = (token(key, subject=f"user-{i}") for i in range(3))
    for access in (first, second, third, third, second, first):
        await cache.verify(access, ACCESS_AUDIENCE)
    # The oldest went out when the third came in, and was checked again.
    assert checked == [first, second, third, first]
    assert len(cache._verified) == 2
