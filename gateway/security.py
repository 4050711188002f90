"""Token verification with auth_service's public keys (JWKS); no secret is shared."""

import time
from dataclasses import dataclass

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.errors import Forbidden, Unauthorized
from common.tokens import ACCESS_AUDIENCE, AGENT_AUDIENCE, ALGORITHM, ISSUER
from gateway.clients import ServiceClient

ALGORITHMS = [ALGORITHM]

bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Principal:
    id: str
    roles: tuple[str, ...]
    email: str | None = None

    def has(self, role: str) -> bool:
        return role in self.roles or "admin" in self.roles


@dataclass(frozen=True)
class Agent:
    provider_id: str
    owner_id: str


class JwksCache:
    """Public keys by kid; an unknown kid triggers a refetch, at most every few seconds."""

    def __init__(self, auth: ServiceClient, min_interval_s: float) -> None:
        self.auth = auth
        self.min_interval_s = min_interval_s
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = 0.0

    async def key(self, kid: str) -> jwt.PyJWK:
        if kid not in self.keys and time.monotonic() - self.fetched_at > self.min_interval_s:
            jwks = await self.auth.request("GET", "/.well-known/jwks.json")
            self.keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
            self.fetched_at = time.monotonic()
        if kid not in self.keys:
            raise Unauthorized("token signed with an unknown key")
        return self.keys[kid]

    async def verify(self, token: str, audience: str) -> dict:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise Unauthorized("malformed token") from exc
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
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing bearer token")
    return credentials.credentials


async def current_principal(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Principal:
    claims = await request.app.state.jwks.verify(_token(credentials), ACCESS_AUDIENCE)
    return Principal(
        id=claims["sub"], roles=tuple(claims.get("roles", ())), email=claims.get("email")
    )


def require(role: str):  # type: ignore[no-untyped-def]
    """A dependency admitting principals with the role (admins have every role)."""

    async def check(principal: Principal = Depends(current_principal)) -> Principal:
        if not principal.has(role):
            raise Forbidden(f"this action needs the {role} role")
        return principal

    return check


async def current_agent(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
) -> Agent:
    claims = await request.app.state.jwks.verify(_token(credentials), AGENT_AUDIENCE)
    if "agent" not in claims.get("roles", ()) or "owner" not in claims:
        raise Unauthorized("not a provider agent credential")
    return Agent(provider_id=claims["sub"], owner_id=claims["owner"])
