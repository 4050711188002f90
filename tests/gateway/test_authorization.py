"""Every route of the public API against every kind of caller that must not get in.

The table below names, for each route, who may call it and which object its path names.
A route added to the gateway without a row here fails test_every_route_has_a_rule, so no
route ships without its authorization being tested.
"""

from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import GatewaySettings
from gpumarket.client import Client
from gpumarket.platform import LocalPlatform
from tests.fixtures.platform import join_machine, new_user

PUBLIC = "public"  # no credential needed (or the body carries its own, like a join token)
USER = "user"  # any user, by access token or API key
SESSION = "session"  # a logged-in user; API keys can't manage credentials
SESSION_OR_SELF = "session or self"  # a logged-in user, or an API key revoking itself


@dataclass(frozen=True)
class Rule:
    who: str  # PUBLIC, USER, SESSION, "requester", "provider", "admin" or "agent"
    # The kind of object the path's id names; someone else's must answer 404.
    owns: str | None = None
    body: dict | None = None
    params: dict | None = None


JOB_BODY = {"image": "x", "command": ["true"], "max_duration_s": 5}

RULES: dict[tuple[str, str], Rule] = {
    ("POST", "/v1/auth/register"): Rule(PUBLIC),
    ("POST", "/v1/auth/login"): Rule(PUBLIC),
    ("POST", "/v1/auth/refresh"): Rule(PUBLIC),
    ("POST", "/v1/auth/logout"): Rule(SESSION),
    ("GET", "/v1/me"): Rule(USER),
    ("POST", "/v1/api-keys"): Rule(SESSION, body={"name": "k"}),
    ("GET", "/v1/api-keys"): Rule(SESSION),
    ("DELETE", "/v1/api-keys/{key_id}"): Rule(SESSION_OR_SELF, owns="api_key"),
    ("POST", "/v1/files"): Rule("requester", body={"filename": "f", "size": 1, "sha256": "0" * 64}),
    ("GET", "/v1/files/usage"): Rule("requester"),
    ("GET", "/v1/files/{file_id}"): Rule("requester", owns="file"),
    ("DELETE", "/v1/files/{file_id}"): Rule("requester", owns="file"),
    ("POST", "/v1/jobs"): Rule("requester", body=JOB_BODY),
    ("POST", "/v1/jobs/batch"): Rule(
        "requester",
        body={"template": {**JOB_BODY, "resources": {"gpu_models": ["no-such-gpu"]}}, "count": 1},
    ),
    ("GET", "/v1/jobs"): Rule("requester"),
    ("GET", "/v1/jobs/{job_id}"): Rule("requester", owns="job"),
    ("GET", "/v1/jobs/{job_id}/events"): Rule("requester", owns="job"),
    ("GET", "/v1/jobs/{job_id}/logs"): Rule("requester", owns="job"),
    ("GET", "/v1/jobs/{job_id}/outputs"): Rule("requester", owns="job"),
    ("POST", "/v1/jobs/{job_id}/cancel"): Rule("requester", owns="job"),
    ("POST", "/v1/providers/join-tokens"): Rule("provider"),
    ("POST", "/v1/providers/join"): Rule(PUBLIC),
    ("GET", "/v1/providers"): Rule("provider"),
    ("GET", "/v1/providers/{provider_id}"): Rule("provider", owns="provider"),
    ("POST", "/v1/providers/{provider_id}/credentials/revoke"): Rule("provider", owns="provider"),
    ("POST", "/v1/providers/{provider_id}/drain"): Rule("provider", owns="provider"),
    ("POST", "/v1/providers/{provider_id}/resume"): Rule("provider", owns="provider"),
    # The price join_machine gave, so the machine stays above every test job's price cap.
    ("PUT", "/v1/providers/{provider_id}/prices"): Rule(
        "provider", owns="provider", body={"prices": {"T4": 1000}}
    ),
    ("GET", "/v1/offers"): Rule(USER),
    ("GET", "/v1/agent/jobs/{job_id}/inputs"): Rule("agent", owns="task", params={"attempt": 0}),
    ("POST", "/v1/agent/jobs/{job_id}/outputs"): Rule(
        "agent", owns="task", body={"attempt": 0, "files": []}
    ),
    ("POST", "/v1/agent/jobs/{job_id}/outputs/complete"): Rule(
        "agent",
        owns="task",
        body={
            "attempt": 0,
            "path": "big.bin",
            "upload_id": "u",
            "parts": [{"part_number": 1, "etag": "e"}],
        },
    ),
    ("POST", "/v1/agent/jobs/{job_id}/outputs/abort"): Rule(
        "agent", owns="task", body={"attempt": 0, "path": "big.bin", "upload_id": "u"}
    ),
    ("GET", "/v1/agent/provider"): Rule("agent"),
    ("POST", "/v1/agent/provider/drain"): Rule("agent"),
    ("POST", "/v1/agent/provider/resume"): Rule("agent"),
    ("PUT", "/v1/agent/provider/prices"): Rule("agent", body={"prices": {"T4": 1000}}),
    ("POST", "/v1/agent/provider/leave"): Rule("agent"),
    ("GET", "/v1/billing/balance"): Rule(USER),
    ("GET", "/v1/billing/ledger"): Rule(USER),
    ("GET", "/v1/billing/earnings"): Rule("provider"),
    ("POST", "/v1/admin/billing/credits"): Rule(
        "admin", body={"user_id": "00000000-0000-0000-0000-000000000000", "amount": 1}
    ),
    ("GET", "/v1/admin/billing/totals"): Rule("admin"),
    ("GET", "/v1/admin/users"): Rule("admin"),
    ("POST", "/v1/admin/users/{user_id}/disable"): Rule("admin", owns="user"),
    ("POST", "/v1/admin/users/{user_id}/enable"): Rule("admin", owns="user"),
    ("POST", "/v1/admin/signing-keys/rotate"): Rule("admin"),
}

# Who is refused, and how, for each kind of rule: 401 for the wrong kind of credential,
# 403 for a user without the role.
REFUSED: dict[str, dict[str, int]] = {
    USER: {"agent": 401},
    SESSION: {"agent": 401, "requester_key": 403},
    # The key revoked is the requester's: the provider's key may not touch it.
    SESSION_OR_SELF: {"agent": 401, "provider_key": 403},
    "requester": {"provider": 403, "agent": 401, "provider_key": 403},
    "provider": {"requester": 403, "agent": 401, "requester_key": 403},
    "admin": {"requester": 403, "provider": 403, "agent": 401, "requester_key": 403},
    "agent": {"requester": 401, "provider": 401, "admin": 401, "requester_key": 401},
}


def api_routes() -> list[tuple[str, str]]:
    """Every route of the public API, from the OpenAPI document the gateway serves."""
    paths = create_app(GatewaySettings(dev_mode=True)).openapi()["paths"]
    return sorted((method.upper(), path) for path, ops in paths.items() for method in ops)


def test_every_route_has_a_rule() -> None:
    missing = [r for r in api_routes() if r not in RULES]
    assert not missing, f"routes without an authorization rule in RULES: {missing}"
    stale = [r for r in RULES if r not in api_routes()]
    assert not stale, f"rules for routes that no longer exist: {stale}"


@dataclass
class World:
    """Callers of every kind, and objects owned by someone else than the callers."""

    tokens: dict[str, str]
    # For each kind of object: an id that belongs to someone other than the callers.
    foreign: dict[str, str]
    # For each kind of object: an id the rightful caller owns (to show the rule admits it).
    own: dict[str, str]


@pytest.fixture(scope="module")
def world(platform: LocalPlatform, admin: Client) -> World:
    requester = new_user(platform, "requester")
    provider = new_user(platform, "provider")
    stranger = new_user(platform, ["requester", "provider"])

    def job_of(client: Client) -> str:
        spec = {**JOB_BODY, "resources": {"gpu_models": ["no-such-gpu"]}}
        return client.submit(spec).id

    def key_of(client: Client, roles: list[str]) -> dict:
        return client.request("POST", "/v1/api-keys", json={"name": "k", "roles": roles})

    own_machine = join_machine(platform, provider)
    foreign_machine = join_machine(platform, stranger)
    requester_key = key_of(requester, ["requester"])
    provider_key = key_of(provider, ["provider"])
    foreign_key = key_of(stranger, ["requester"])
    return World(
        tokens={
            "requester": requester.token or "",
            "provider": provider.token or "",
            "admin": admin.token or "",
            "agent": own_machine["credential"],
            "requester_key": requester_key["key"],
            "provider_key": provider_key["key"],
        },
        foreign={
            "job": job_of(stranger),
            "file": stranger.upload(b"x", "f.txt").file_id,
            "provider": foreign_machine["provider_id"],
            "api_key": foreign_key["id"],
            # A job sent to no one: not a task of the caller's machine.
            "task": job_of(stranger),
        },
        own={
            "job": job_of(requester),
            "file": requester.upload(b"x", "f.txt").file_id,
            "provider": own_machine["provider_id"],
            "api_key": requester_key["id"],
            "user": stranger.request("GET", "/v1/me")["id"],
        },
    )


def call(platform: LocalPlatform, method: str, path: str, rule: Rule, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs: dict[str, Any] = {"headers": headers, "params": rule.params, "timeout": 10}
    if rule.body is not None:
        kwargs["json"] = rule.body
    with httpx.Client(base_url=platform.gateway_url) as http:
        if path.endswith("/events"):
            with http.stream(method, path, **kwargs) as response:
                return response.status_code
        return http.request(method, path, **kwargs).status_code


def fill(path: str, object_id: str) -> str:
    start, end = path.index("{"), path.index("}")
    return path[:start] + object_id + path[end + 1 :]


def caller_for(rule: Rule) -> str:
    return {USER: "requester", SESSION: "requester", SESSION_OR_SELF: "requester"}.get(
        rule.who, rule.who
    )


ROUTES = sorted(RULES)


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_without_a_credential(platform: LocalPlatform, method: str, path: str) -> None:
    rule = RULES[(method, path)]
    if rule.who == PUBLIC:
        pytest.skip("public route")
    target = fill(path, "00000000-0000-0000-0000-000000000000") if "{" in path else path
    for token in (None, "garbage", "gpm_not-a-real-key", "gpma_not-a-real-credential"):
        assert call(platform, method, target, rule, token) == 401, token


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_with_each_wrong_role(
    platform: LocalPlatform, world: World, method: str, path: str
) -> None:
    rule = RULES[(method, path)]
    if rule.who == PUBLIC:
        pytest.skip("public route")
    target = path
    if "{" in path:
        target = fill(path, world.own.get(rule.owns or "", world.foreign.get(rule.owns or "", "x")))
    for caller, expected in REFUSED[rule.who].items():
        got = call(platform, method, target, rule, world.tokens[caller])
        assert got == expected, f"{caller} got {got}, expected {expected}"


@pytest.mark.parametrize(
    ("method", "path"),
    [r for r in ROUTES if RULES[r].owns not in (None, "user")],
    ids=[f"{m} {p}" for m, p in ROUTES if RULES[(m, p)].owns not in (None, "user")],
)
def test_with_someone_elses_id(
    platform: LocalPlatform, world: World, method: str, path: str
) -> None:
    rule = RULES[(method, path)]
    assert rule.owns is not None
    token = world.tokens[caller_for(rule)]
    assert call(platform, method, fill(path, world.foreign[rule.owns]), rule, token) == 404
    # A malformed id is not found either, never a 500 or a 422 that tells ids apart.
    assert call(platform, method, fill(path, "not-an-id"), rule, token) == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [r for r in ROUTES if RULES[r].who not in (PUBLIC, "agent")],
    ids=[f"{m} {p}" for m, p in ROUTES if RULES[(m, p)].who not in (PUBLIC, "agent")],
)
def test_the_rightful_caller_gets_in(
    platform: LocalPlatform, world: World, method: str, path: str
) -> None:
    rule = RULES[(method, path)]
    if path in ("/v1/auth/logout", "/v1/admin/signing-keys/rotate", "/v1/admin/billing/credits"):
        pytest.skip("ends the shared session / covered in test_auth_api and test_billing_api")
    target = path
    if rule.owns is not None:
        target = fill(path, world.own[rule.owns])
    if method == "DELETE":
        return  # revoking the caller's own key here would break the other tests' callers
    status = call(platform, method, target, rule, world.tokens[caller_for(rule)])
    assert status < 400, f"{status}"
