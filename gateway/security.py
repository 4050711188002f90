"""Who is calling: access JWTs verified with auth_service's public keys (JWKS), API keys
and provider credentials checked by auth_service.

A signature proves who issued a token, not that it still holds: each request also needs
auth_service's word that the user, session, key or credential is still good. Its answers
are kept a few seconds (gateway/auth_cache.py); revoking through any gateway replica
evicts them everywhere at once.
"""

import time
from dataclasses import dataclass
from typing import Literal

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.aio import Flights
from common.errors import Forbidden, Unauthorized
from common.tokens import ACCESS_AUDIENCE, AGENT_PREFIX, ALGORITHM, API_KEY_PREFIX, ISSUER
from gateway.auth_cache import AuthCache, cache_key
from gateway.clients import ServiceClient

ALGORITHMS = [ALGORITHM]

bearer = HTTPBearer(auto_error=False, description="An access token or an API key")


@dataclass(frozen=True)
class Principal:
    id: str
    roles: tuple[str, ...]
    email: str
    kind: Literal["session", "api_key"]
    session_id: str | None = None
    api_key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def has(self, role: str) -> bool:
        return role in self.roles or self.is_admin

    def owner_filter(self) -> str | None:
        """Whose objects this principal may see: its own, or everyone's for an admin."""
        return None if self.is_admin else self.id

    def owner_params(self) -> dict[str, str]:
        """owner_filter() as the query of an internal service's listing."""
        return {} if self.is_admin else {"owner_id": self.id}


@dataclass(frozen=True)
class Agent:
    provider_id: str
    owner_id: str


# Tokens whose signature was verified, kept until they expire (like Envoy's jwt_cache).
VERIFIED_TOKENS = 10_000


class JwksCache:
    """Public keys by kid, refetched when older than max_age_s (auth_service publishes a
    new key longer than that before it signs with it) and, at most every
    min_interval_s, when a token names a kid we don't know.

    A client sends the same access token on every request, and checking its signature
    was a tenth of the gateway's CPU per request: the claims of a token already verified
    are kept, keyed by the whole token (signature included), until the token expires or
    the keys are fetched again. Same bytes, same keys: the same answer.
    """

    def __init__(
        self,
        auth: ServiceClient,
        min_interval_s: float,
        max_age_s: float,
        verified_max: int = VERIFIED_TOKENS,
    ) -> None:
        self.auth = auth
        self.min_interval_s = min_interval_s
        self.max_age_s = max_age_s
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = float("-inf")
        self.verified_max = verified_max
        # (token, audience) -> claims, oldest first.
        self._verified: dict[tuple[str, str], dict] = {}
        # When the keys age out, every request in flight finds them stale at once.
        self._fetches: Flights[None] = Flights()

    async def _fetch(self) -> None:
        """The keys, fetched once for all the requests that want them now."""
        await self._fetches.run("jwks", self._fetch_now)

    async def _fetch_now(self) -> None:
        jwks = await self.auth.request("GET", "/.well-known/jwks.json")
        self.keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
        self.fetched_at = time.monotonic()
        # A key may have been withdrawn: what it verified is verified again.
        self._verified.clear()

    async def key(self, kid: str) -> jwt.PyJWK:
        age = time.monotonic() - self.fetched_at
        if age > self.max_age_s or (kid not in self.keys and age > self.min_interval_s):
            await self._fetch()
        if kid not in self.keys:
            raise Unauthorized("token signed with an unknown key")
        return self.keys[kid]

    async def verify(self, token: str, audience: str) -> dict:
        claims = self._verified.get((token, audience))
        if (
            claims is not None
            and time.time() < claims["exp"]
            and time.monotonic() - self.fetched_at <= self.max_age_s
        ):
            return claims
        self._verified.pop((token, audience), None)
        claims = await self._verify(token, audience)
        if len(self._verified) >= self.verified_max:
            del self._verified[next(iter(self._verified))]
        self._verified[(token, audience)] = claims
        return claims

    async def _verify(self, token: str, audience: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("malformed token") from exc
        # Checked before any key is looked up: alg=none and HS256 made with a public key
        # as the HMAC secret never reach the verifier.
        if header.get("alg") not in ALGORITHMS or not isinstance(header.get("kid"), str):
            raise Unauthorized("token algorithm or key id not accepted")
        key = await self.key(header["kid"])
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=audience,
                issuer=ISSUER,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired") from exc
        except jwt.InvalidTokenError as exc:
            raise Unauthorized(f"invalid token: {exc}") from exc


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("missing bearer token")
    return credentials.credentials


async def _authenticate(request: Request, body: dict) -> dict:
    cache: AuthCache = request.app.state.auth_cache
    auth: ServiceClient = request.app.state.auth
    return await cache.lookup(
        cache_key(body), lambda: auth.request("POST", "/internal/authenticate", json=body)
    )


async def current_principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Principal:
    """A user, by access token or API key; refused once disabled, logged out or revoked."""
    token = _token(credentials)
    if token.startswith(API_KEY_PREFIX):
        body = {"kind": "api_key", "secret": token}
    elif token.startswith(AGENT_PREFIX):
        raise Unauthorized("a provider credential is only accepted on /v1/agent routes")
    else:
        claims = await request.app.state.jwks.verify(token, ACCESS_AUDIENCE)
        body = {"kind": "session", "user_id": claims["sub"], "session_id": claims.get("sid")}
    found = await _authenticate(request, body)
    principal = Principal(
        id=found["user_id"],
        roles=tuple(found["roles"]),
        email=found["email"],
        kind=found["kind"],
        session_id=found.get("session_id"),
        api_key_id=found.get("api_key_id"),
    )
    await request.app.state.limiter.check(
        "principal", principal.id, request.app.state.settings.rate_limit_per_principal
    )
    return principal


def require(role: str):  # type: ignore[no-untyped-def]
    """A dependency admitting principals with the role (admins have every role)."""

    async def check(principal: Principal = Depends(current_principal)) -> Principal:
        if not principal.has(role):
            raise Forbidden(f"this action needs the {role} role")
        return principal

    return check


async def require_admin(principal: Principal = Depends(current_principal)) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this action needs the admin role")
    return principal


async def require_session(principal: Principal = Depends(current_principal)) -> Principal:
    """For managing credentials: a logged-in user, not an API key minting more keys."""
    if principal.kind != "session":
        raise Forbidden("log in to do this; an API key can't manage credentials")
    return principal


async def current_agent(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Agent:
    token = _token(credentials)
    if not token.startswith(AGENT_PREFIX):
        raise Unauthorized("not a provider credential")
    found = await _authenticate(request, {"kind": "agent", "secret": token})
    await request.app.state.limiter.check(
        "agent", found["provider_id"], request.app.state.settings.rate_limit_per_agent
    )
    return Agent(provider_id=found["provider_id"], owner_id=found["owner_id"])
