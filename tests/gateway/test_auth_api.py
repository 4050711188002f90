"""Accounts, tokens, API keys and provider credentials through the public REST API."""

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from httpx_retries import Retry

from gpumarket.client import ApiError, Client
from gpumarket.platform import LocalPlatform
from tests.fixtures.platform import client_address, join_machine, new_user


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _hs256(claims: dict, secret: bytes, kid: str) -> str:
    """An HS256 token made by hand: PyJWT rightly refuses a public key as an HMAC secret."""
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{_b64(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def status_with(platform: LocalPlatform, token: str, path: str = "/v1/me") -> int:
    response = httpx.get(
        f"{platform.gateway_url}{path}", headers={"Authorization": f"Bearer {token}"}
    )
    return response.status_code


NO_RETRY = Retry(total=0)


def anonymous(platform: LocalPlatform) -> Client:
    # No retries: these tests want to see the 429s themselves.
    return Client(
        platform.gateway_url, headers={"X-Forwarded-For": client_address()}, retry=NO_RETRY
    )


async def _signing_key(platform: LocalPlatform, kid: str) -> str:
    assert platform.servers is not None
    conn = await asyncpg.connect(platform.servers.postgres.dsn)
    try:
        return await conn.fetchval("SELECT private_key_pem FROM signing_keys WHERE kid = $1", kid)
    finally:
        await conn.close()


class TestRegisterAndLogin:
    def test_register_login_me(self, platform) -> None:  # type: ignore[no-untyped-def]
        client = anonymous(platform)
        email = f"Alice-{secrets.token_hex(3)}@Example.COM"
        user = client.register(f"  {email} ", "a-good-password", ["provider", "requester"])
        assert user.email == email.lower()
        assert user.roles == ["requester", "provider"] and user.disabled is False
        login = client.request(
            "POST", "/v1/auth/login", json={"email": email, "password": "a-good-password"}
        )
        assert login["token_type"] == "bearer" and 0 < login["expires_in"] <= 900
        assert login["refresh_token"].startswith("gpmr_") and login["refresh_expires_in"] > 0
        client.token = login["access_token"]
        assert client.me().id == user.id

    def test_duplicate_email_is_409(self, platform) -> None:  # type: ignore[no-untyped-def]
        client = anonymous(platform)
        email = f"bob-{secrets.token_hex(3)}@example.com"
        client.register(email, "a-good-password", "provider")
        with pytest.raises(ApiError) as err:
            client.register(email.upper(), "another-password", "requester")
        assert err.value.status_code == 409
        assert err.value.body["errors"][0]["field"] == "email"

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ({"email": "not-an-email", "password": "a-good-password"}, "email"),
            ({"email": "c@example.com", "password": "short"}, "password"),
            ({"email": "c@example.com", "password": "password123"}, "password"),
            (
                {"email": "c@example.com", "password": "a-good-password", "roles": ["admin"]},
                "roles.0",
            ),
            ({"email": "c@example.com", "password": "a-good-password", "roles": []}, "roles"),
            ({"email": "c@example.com", "roles": ["requester"]}, "password"),
            ({"email": "c@example.com", "password": "a-good-password", "role": "x"}, "role"),
        ],
    )
    def test_bad_registration_is_422_naming_the_field(self, platform, body, field) -> None:  # type: ignore[no-untyped-def]
        body = {"roles": ["requester"], **body}
        response = anonymous(platform).http.post("/v1/auth/register", json=body)
        assert response.status_code == 422, response.text
        assert field in [e["field"] for e in response.json()["errors"]]

    def test_wrong_password_and_unknown_email_are_the_same_401(self, platform) -> None:  # type: ignore[no-untyped-def]
        client = anonymous(platform)
        email = f"dave-{secrets.token_hex(3)}@example.com"
        client.register(email, "a-good-password", "requester")
        answers = []
        for who, password in [(email, "wrong-password"), (f"x{email}", "a-good-password")]:
            with pytest.raises(ApiError) as err:
                client.login(who, password)
            answers.append((err.value.status_code, err.value.body))
        assert answers[0] == answers[1]
        assert answers[0][0] == 401


class TestBruteForce:
    def test_failed_logins_for_one_email_are_throttled_from_any_address(self, platform) -> None:  # type: ignore[no-untyped-def]
        victim = new_user(platform)
        email = victim.request("GET", "/v1/me")["email"]
        codes = []
        for _ in range(7):  # each guess from a new address: the per-address limit never bites
            response = anonymous(platform).http.post(
                "/v1/auth/login", json={"email": email, "password": "guess-guess-guess"}
            )
            codes.append(response.status_code)
        assert codes[:5] == [401] * 5 and codes[-1] == 429
        assert int(response.headers["Retry-After"]) >= 1
        # The right password from the right person waits too; the session it has is intact.
        with pytest.raises(ApiError) as err:
            anonymous(platform).login(email, "correct-horse-battery")
        assert err.value.status_code == 429
        assert victim.request("GET", "/v1/me")["email"] == email

    def test_one_address_is_throttled_across_emails(self, platform) -> None:  # type: ignore[no-untyped-def]
        attacker = anonymous(platform)
        codes = []
        for i in range(25):
            response = attacker.http.post(
                "/v1/auth/login",
                json={
                    "email": f"spray-{i}-{secrets.token_hex(2)}@example.com",
                    "password": "x" * 12,
                },
            )
            codes.append(response.status_code)
        assert 429 in codes and set(codes) == {401, 429}
        refused = attacker.http.post(
            "/v1/auth/login", json={"email": "another@example.com", "password": "x" * 12}
        )
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        # Another address is not affected.
        assert (
            anonymous(platform)
            .http.post(
                "/v1/auth/login", json={"email": "another@example.com", "password": "x" * 12}
            )
            .status_code
            == 401
        )


class TestTokens:
    def test_forged_tokens_are_refused(self, platform, requester: Client) -> None:  # type: ignore[no-untyped-def]
        real = requester.token
        assert real is not None
        header = jwt.get_unverified_header(real)
        claims = jwt.decode(real, options={"verify_signature": False})
        head, body, sig = real.split(".")
        auth_url = f"http://127.0.0.1:{platform.ports['auth_service']}"
        jwks = httpx.get(f"{auth_url}/.well-known/jwks.json").json()
        public_jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
        public_pem = jwt.PyJWK(public_jwk).key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        forged = {
            "alg none": f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': header['kid']})}.{body}.",
            "HS256 with a made-up secret": jwt.encode(
                claims, "s" * 32, algorithm="HS256", headers={"kid": header["kid"]}
            ),
            # The classic confusion: the public key used as an HMAC secret.
            "HS256 with the public key": _hs256(claims, public_pem, header["kid"]),
            "tampered claims": f"{head}.{_b64({**claims, 'roles': ['admin']})}.{sig}",
            "tampered subject": f"{head}.{_b64({**claims, 'sub': 'someone-else'})}.{sig}",
            "unknown kid": f"{_b64({**header, 'kid': 'unknown-kid'})}.{body}.{sig}",
            "no kid": f"{_b64({'alg': header['alg'], 'typ': 'JWT'})}.{body}.{sig}",
            "garbage": "not.a.token",
        }
        for name, token in forged.items():
            assert status_with(platform, token) == 401, name
        assert status_with(platform, real) == 200

    def test_expired_and_wrong_audience_tokens_are_refused(
        self, platform, requester: Client
    ) -> None:  # type: ignore[no-untyped-def]
        assert requester.token is not None
        header = jwt.get_unverified_header(requester.token)
        claims = jwt.decode(requester.token, options={"verify_signature": False})
        pem = asyncio.run(_signing_key(platform, header["kid"]))
        key = serialization.load_pem_private_key(pem.encode(), password=None)
        now = datetime.now(UTC)

        def signed(**changes: object) -> str:
            return jwt.encode(
                {**claims, **changes}, key, algorithm="EdDSA", headers={"kid": header["kid"]}
            )

        # Signed with the real key: only the claims make them wrong.
        assert status_with(platform, signed()) == 200
        assert status_with(platform, signed(exp=now - timedelta(seconds=5))) == 401
        assert status_with(platform, signed(aud="something-else")) == 401
        assert status_with(platform, signed(iss="someone-else")) == 401
        # A valid signature on a session that does not exist.
        assert status_with(platform, signed(sid="00000000-0000-0000-0000-000000000000")) == 401

    def test_refresh_rotates_and_a_reused_refresh_token_ends_the_session(self, platform) -> None:  # type: ignore[no-untyped-def]
        user = new_user(platform)
        first_refresh = user.refresh_token
        pair = user.request("POST", "/v1/auth/refresh", json={"refresh_token": first_refresh})
        assert pair["refresh_token"] != first_refresh
        assert status_with(platform, pair["access_token"]) == 200
        with pytest.raises(ApiError) as err:
            user.request("POST", "/v1/auth/refresh", json={"refresh_token": first_refresh})
        assert (
            err.value.status_code == 401 and err.value.body["errors"][0]["field"] == "refresh_token"
        )
        # Reuse means theft: the whole session is gone, for the thief and the owner alike.
        assert status_with(platform, pair["access_token"]) == 401
        assert status_with(platform, user.token or "") == 401
        with pytest.raises(ApiError):
            user.request("POST", "/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})

    def test_logout_ends_this_session_or_all(self, platform) -> None:  # type: ignore[no-untyped-def]
        email = f"lo-{secrets.token_hex(3)}@example.com"
        anonymous(platform).register(email, "correct-horse-battery", "requester")
        a, b, c = anonymous(platform), anonymous(platform), anonymous(platform)
        for client in (a, b, c):
            client.login(email, "correct-horse-battery")
        a.request("POST", "/v1/auth/logout")
        assert status_with(platform, a.token or "") == 401
        assert status_with(platform, b.token or "") == 200
        with pytest.raises(ApiError):
            a.request("POST", "/v1/auth/refresh", json={"refresh_token": a.refresh_token})
        b.request("POST", "/v1/auth/logout", json={"everywhere": True})
        assert status_with(platform, c.token or "") == 401

    def test_key_rotation_logs_no_one_out(self, platform, admin: Client) -> None:  # type: ignore[no-untyped-def]
        before = new_user(platform)
        old_kid = jwt.get_unverified_header(before.token or "")["kid"]
        rotated = admin.request("POST", "/v1/admin/signing-keys/rotate")
        assert rotated["kid"] != old_kid
        assert status_with(platform, before.token or "") == 200
        deadline = time.monotonic() + 10
        while True:
            after = new_user(platform)
            if jwt.get_unverified_header(after.token or "")["kid"] == rotated["kid"]:
                break
            assert time.monotonic() < deadline, "the new key never started signing"
            time.sleep(0.3)
        assert status_with(platform, after.token or "") == 200
        assert status_with(platform, before.token or "") == 200


class TestApiKeys:
    def test_a_key_is_shown_once_scoped_and_revocable(self, platform) -> None:  # type: ignore[no-untyped-def]
        user = new_user(platform, ["requester", "provider"])
        created = user.request(
            "POST",
            "/v1/api-keys",
            json={"name": "ci", "roles": ["requester"], "expires_in_days": 30},
        )
        secret = created["key"]
        assert secret.startswith("gpm_") and secret.startswith(created["prefix"])
        listed = user.request("GET", "/v1/api-keys")
        assert [k["id"] for k in listed] == [created["id"]]
        assert secret not in json.dumps(listed) and "key" not in listed[0]

        by_key = Client(platform.gateway_url, token=secret)
        assert by_key.request("GET", "/v1/me")["id"] == user.request("GET", "/v1/me")["id"]
        assert by_key.request("GET", "/v1/jobs") == []
        with pytest.raises(ApiError) as err:  # scoped to requester: not a provider
            by_key.request("GET", "/v1/providers")
        assert err.value.status_code == 403
        with pytest.raises(ApiError) as err:  # a key can't mint keys
            by_key.request("POST", "/v1/api-keys", json={"name": "copy"})
        assert err.value.status_code == 403

        user.request("DELETE", f"/v1/api-keys/{created['id']}")
        with pytest.raises(ApiError) as err:
            by_key.request("GET", "/v1/me")
        assert err.value.status_code == 401

    def test_a_key_may_revoke_itself_but_no_other_key(self, requester: Client, platform) -> None:  # type: ignore[no-untyped-def]
        first = requester.create_api_key("laptop")
        second = requester.create_api_key("ci")
        by_first = Client(platform.gateway_url, token=first.key)
        with pytest.raises(ApiError) as err:
            by_first.revoke_api_key(second.id)
        assert err.value.status_code == 403
        assert by_first.revoke_api_key(first.id).revoked_at is not None
        with pytest.raises(ApiError) as err:
            by_first.me()
        assert err.value.status_code == 401
        assert Client(platform.gateway_url, token=second.key).me().id == requester.me().id

    def test_a_key_cannot_be_scoped_beyond_its_user(self, requester: Client) -> None:
        with pytest.raises(ApiError) as err:
            requester.request("POST", "/v1/api-keys", json={"name": "x", "roles": ["admin"]})
        assert err.value.status_code == 403
        with pytest.raises(ApiError) as err:
            requester.request("POST", "/v1/api-keys", json={"name": "x", "roles": ["root"]})
        assert err.value.status_code == 422 and err.value.body["errors"][0]["field"] == "roles.0"


class TestDisabledUser:
    def test_disabling_ends_every_kind_of_access_on_the_next_request(
        self, platform, admin: Client
    ) -> None:  # type: ignore[no-untyped-def]
        user = new_user(platform, ["requester", "provider"])
        me = user.request("GET", "/v1/me")
        key = user.request("POST", "/v1/api-keys", json={"name": "ci"})["key"]
        machine = join_machine(platform, user)
        agent_path = f"/v1/agent/jobs/{'0' * 8}-0000-0000-0000-{'0' * 12}/inputs?attempt=0"
        assert status_with(platform, machine["credential"], agent_path) == 404  # accepted, no task
        assert status_with(platform, key) == 200

        disabled = admin.request("POST", f"/v1/admin/users/{me['id']}/disable")
        assert disabled["disabled"] is True
        assert status_with(platform, user.token or "") == 401
        assert status_with(platform, key) == 401
        assert status_with(platform, machine["credential"], agent_path) == 401
        with pytest.raises(ApiError) as err:
            user.request("POST", "/v1/auth/refresh", json={"refresh_token": user.refresh_token})
        assert err.value.status_code == 401
        with pytest.raises(ApiError) as err:
            anonymous(platform).login(me["email"], "correct-horse-battery")
        assert err.value.status_code == 401
        assert any(
            u["id"] == me["id"] and u["disabled"]
            for u in admin.request("GET", "/v1/admin/users", params={"limit": 1000})
        )

        # Its machines left the market with it, and come back with it.
        provider_path = f"/v1/providers/{machine['provider_id']}"
        assert admin.request("GET", provider_path)["suspended_reason"] == "owner disabled"
        admin.request("POST", f"/v1/admin/users/{me['id']}/enable")
        assert admin.request("GET", provider_path)["suspended_reason"] is None
        assert status_with(platform, key) == 200
        assert status_with(platform, user.token or "") == 401  # ended sessions stay ended
        anonymous(platform).login(me["email"], "correct-horse-battery")


class TestProviderCredentials:
    def test_owner_and_admin_can_revoke_a_machine_others_cannot_see_it(
        self, platform, admin: Client
    ) -> None:  # type: ignore[no-untyped-def]
        owner = new_user(platform, "provider")
        machine = join_machine(platform, owner)
        path = f"/v1/providers/{machine['provider_id']}"
        assert owner.request("GET", path)["id"] == machine["provider_id"]
        stranger = new_user(platform, "provider")
        for method, sub in (("GET", ""), ("POST", "/credentials/revoke")):
            with pytest.raises(ApiError) as err:
                stranger.request(method, path + sub)
            assert err.value.status_code == 404
        agent_path = f"/v1/agent/jobs/{'0' * 8}-0000-0000-0000-{'0' * 12}/inputs?attempt=0"
        assert status_with(platform, machine["credential"], agent_path) == 404
        assert owner.request("POST", path + "/credentials/revoke") == {"revoked": 1}
        assert status_with(platform, machine["credential"], agent_path) == 401
        assert owner.request("GET", path)["suspended_reason"] == "credential revoked"

        second = join_machine(platform, owner)
        assert admin.request(
            "POST", f"/v1/providers/{second['provider_id']}/credentials/revoke"
        ) == {"revoked": 1}
        assert status_with(platform, second["credential"], agent_path) == 401

    def test_join_token_binds_to_one_machine(self, platform) -> None:  # type: ignore[no-untyped-def]
        owner = new_user(platform, "provider")
        token = owner.request("POST", "/v1/providers/join-tokens")["token"]
        body = {
            "token": token,
            "machine_id": "machine-a",
            "name": "a",
            "simulated": True,
            "gpus": [{"uuid": "GPU-test-a", "index": 0, "model": "L4", "vram_mb": 24576}],
            # Priced above what the other tests' jobs accept: no daemon runs here.
            "prices": {"L4": 1000},
        }
        first = httpx.post(f"{platform.gateway_url}/v1/providers/join", json=body)
        assert first.status_code == 201, first.text
        again = httpx.post(f"{platform.gateway_url}/v1/providers/join", json=body)
        assert again.status_code == 201
        assert again.json()["provider_id"] == first.json()["provider_id"]
        stolen = httpx.post(
            f"{platform.gateway_url}/v1/providers/join", json={**body, "machine_id": "machine-b"}
        )
        assert stolen.status_code == 409
        bogus = httpx.post(
            f"{platform.gateway_url}/v1/providers/join", json={**body, "token": "gpmj_nope"}
        )
        assert bogus.status_code == 401
        assert [m["name"] for m in owner.request("GET", "/v1/providers")] == ["a"]

    def test_joined_machine_is_listed_with_simulated_gpus(self, platform) -> None:  # type: ignore[no-untyped-def]
        owner = anonymous(platform)
        owner.login("provider@example.com", "sells-gpu-time-1")
        machines = owner.request("GET", "/v1/providers")
        assert len(machines) == 1
        machine = machines[0]
        assert machine["state"] == "online" and machine["simulated"] is True
        assert [g["model"] for g in machine["gpus"]] == ["RTX 4090", "RTX 4090"]
        assert all(g["vram_mb"] == 24 * 1024 and g["simulated"] for g in machine["gpus"])
        assert new_user(platform, "provider").request("GET", "/v1/providers") == []

    def test_offers_show_free_gpus(self, requester: Client) -> None:
        offers = requester.request("GET", "/v1/offers", params={"model": "rtx 4090"})["offers"]
        assert offers and offers[0]["model"] == "RTX 4090" and offers[0]["vram_gb"] == 24.0
        assert requester.request("GET", "/v1/offers", params={"model": "H100"})["offers"] == []


class TestSecretsStayOutOfLogsAndAnswers:
    def test_secrets_appear_only_in_the_answer_that_creates_them(self, platform) -> None:  # type: ignore[no-untyped-def]
        owner = new_user(platform, ["requester", "provider"])
        key = owner.request("POST", "/v1/api-keys", json={"name": "ci"})["key"]
        join_token = owner.request("POST", "/v1/providers/join-tokens")["token"]
        machine = join_machine(platform, owner)
        # Use each, and fail with each, so every code path that might log them runs.
        Client(platform.gateway_url, token=key).request("GET", "/v1/me")
        httpx.post(f"{platform.gateway_url}/v1/providers/join", json={"token": join_token})
        status_with(platform, key + "x")
        status_with(platform, machine["credential"], "/v1/agent/jobs/x/inputs?attempt=0")
        secrets_ = [
            key,
            join_token,
            machine["credential"],
            owner.refresh_token or "",
            owner.token or "",
        ]
        listed = json.dumps(
            [
                owner.request("GET", "/v1/api-keys"),
                owner.request("GET", "/v1/providers"),
                owner.request("GET", "/v1/me"),
            ]
        )
        time.sleep(0.5)  # let the services' log lines reach their files
        logs = "".join(p.read_text(errors="replace") for p in platform.log_dir.glob("*.log"))
        for secret in secrets_:
            assert secret and secret not in listed
            assert secret not in logs
            # Nor a recognisable piece of one.
            assert secret[-20:] not in logs


class TestFrontDoor:
    def test_request_ids_are_echoed_and_reach_every_services_logs(
        self, platform, requester
    ) -> None:  # type: ignore[no-untyped-def]
        rid = f"test-{secrets.token_hex(6)}"
        response = requester.http.get(
            "/v1/me", headers={"Authorization": f"Bearer {requester.token}", "X-Request-ID": rid}
        )
        assert response.status_code == 200 and response.headers["X-Request-ID"] == rid
        generated = requester.http.get("/v1/me", headers={"X-Request-ID": "bad id; DROP"})
        assert generated.headers["X-Request-ID"] != "bad id; DROP"
        # The gateway passes the id on: auth_service logs its side of a request under it.
        failed = requester.http.post(
            "/v1/auth/login",
            json={"email": "nobody@example.com", "password": "wrong-password"},
            headers={"X-Request-ID": rid},
        )
        assert failed.status_code == 401 and failed.headers["X-Request-ID"] == rid
        time.sleep(0.5)
        lines = (platform.log_dir / "auth_service.log").read_text().splitlines()
        entries = [json.loads(line) for line in lines if rid in line]
        assert any(e["msg"] == "login refused" and e["request_id"] == rid for e in entries)
        assert not any("nobody@example.com" in line for line in lines)

    def test_oversized_bodies_are_413_naming_the_body(self, requester: Client) -> None:
        big = {
            "image": "x",
            "command": ["true"],
            "max_duration_s": 5,
            "env": {"A": "x" * 9_000_000},
        }
        with pytest.raises(ApiError) as err:
            requester.request("POST", "/v1/jobs", json=big)
        assert err.value.status_code == 413
        assert err.value.body["errors"][0]["field"] == "body"
        assert requester.request("GET", "/v1/jobs") == []  # nothing half-written

    def test_cors_allows_only_the_configured_origins(self, platform) -> None:  # type: ignore[no-untyped-def]
        def preflight(origin: str) -> httpx.Response:
            return httpx.options(
                f"{platform.gateway_url}/v1/jobs",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )

        allowed = preflight("https://app.example.com")
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        refused = preflight("https://evil.example.com")
        assert "access-control-allow-origin" not in refused.headers
