"""Accounts, tokens and provider joins through the public REST API."""

import base64
import json
import time

import httpx
import jwt
import pytest

from gpumarket.client import ApiError, Client
from tests.fixtures.platform import new_user


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


class TestRegisterAndLogin:
    def test_register_login_me(self, platform) -> None:  # type: ignore[no-untyped-def]
        client = Client(platform.gateway_url)
        user = client.register("  Alice@Example.COM ", "a-good-password", "requester")
        assert user["email"] == "alice@example.com"
        assert user["roles"] == ["requester"]
        login = client.request(
            "POST",
            "/v1/auth/login",
            json={"email": "alice@example.com", "password": "a-good-password"},
        )
        assert login["token_type"] == "bearer" and login["expires_in"] > 0
        client.token = login["access_token"]
        assert client.request("GET", "/v1/me")["id"] == user["id"]

    def test_duplicate_email_is_409(self, platform) -> None:  # type: ignore[no-untyped-def]
        client = Client(platform.gateway_url)
        client.register("bob@example.com", "a-good-password", "provider")
        with pytest.raises(ApiError) as err:
            client.register("BOB@example.com", "another-password", "requester")
        assert err.value.status_code == 409
        assert err.value.body["errors"][0]["field"] == "email"

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            (
                {"email": "not-an-email", "password": "a-good-password", "role": "requester"},
                "email",
            ),
            ({"email": "c@example.com", "password": "short", "role": "requester"}, "password"),
            ({"email": "c@example.com", "password": "a-good-password", "role": "admin"}, "role"),
            ({"email": "c@example.com", "role": "requester"}, "password"),
        ],
    )
    def test_bad_registration_is_422_naming_the_field(self, platform, body, field) -> None:  # type: ignore[no-untyped-def]
        response = httpx.post(f"{platform.gateway_url}/v1/auth/register", json=body)
        assert response.status_code == 422
        assert field in [e["field"] for e in response.json()["errors"]]

    def test_wrong_password_and_unknown_email_are_the_same_401(self, platform) -> None:  # type: ignore[no-untyped-def]
        client = Client(platform.gateway_url)
        client.register("dave@example.com", "a-good-password", "requester")
        answers = []
        for email, password in [
            ("dave@example.com", "wrong-password"),
            ("nobody@example.com", "a-good-password"),
        ]:
            with pytest.raises(ApiError) as err:
                client.login(email, password)
            answers.append((err.value.status_code, err.value.body))
        assert answers[0] == answers[1]
        assert answers[0][0] == 401


class TestTokens:
    def test_forged_tokens_are_refused(self, platform, requester: Client) -> None:  # type: ignore[no-untyped-def]
        real = requester.token
        assert real is not None
        header = jwt.get_unverified_header(real)
        claims = jwt.decode(real, options={"verify_signature": False})
        head, body, sig = real.split(".")
        forged = [
            f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{body}.",
            jwt.encode(claims, "s" * 32, algorithm="HS256", headers={"kid": header["kid"]}),
            f"{head}.{_b64({**claims, 'roles': ['admin']})}.{sig}",
            f"{_b64({**header, 'kid': 'unknown-kid'})}.{body}.{sig}",
            jwt.encode({**claims, "exp": int(time.time()) - 10}, "x" * 32, algorithm="HS256"),
        ]
        for token in forged:
            response = httpx.get(
                f"{platform.gateway_url}/v1/me", headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 401, token


class TestProviders:
    def test_join_token_needs_provider_role(self, requester: Client) -> None:
        with pytest.raises(ApiError) as err:
            requester.request("POST", "/v1/providers/join-tokens")
        assert err.value.status_code == 403

    def test_joined_machine_is_listed_with_simulated_gpus(self, platform) -> None:  # type: ignore[no-untyped-def]
        owner = Client(platform.gateway_url)
        owner.login("provider@example.com", "provider-pw-1")
        machines = owner.request("GET", "/v1/providers")
        assert len(machines) == 1
        machine = machines[0]
        assert machine["state"] == "online" and machine["simulated"] is True
        assert [g["model"] for g in machine["gpus"]] == ["RTX 4090", "RTX 4090"]
        assert all(g["vram_mb"] == 24 * 1024 and g["simulated"] for g in machine["gpus"])
        # Another provider sees none of it.
        assert new_user(platform, "provider").request("GET", "/v1/providers") == []

    def test_offers_show_free_gpus(self, requester: Client) -> None:
        offers = requester.request("GET", "/v1/offers", params={"model": "rtx 4090"})
        assert offers and offers[0]["model"] == "RTX 4090" and offers[0]["vram_gb"] == 24.0
        assert requester.request("GET", "/v1/offers", params={"model": "H100"}) == []

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

    def test_agent_credential_only_reaches_its_own_tasks(self, platform, requester) -> None:  # type: ignore[no-untyped-def]
        owner = new_user(platform, "provider")
        token = owner.request("POST", "/v1/providers/join-tokens")["token"]
        joined = httpx.post(
            f"{platform.gateway_url}/v1/providers/join",
            json={
                "token": token,
                "machine_id": "m",
                "name": "m",
                "simulated": True,
                "gpus": [{"uuid": "GPU-test-m", "index": 0, "model": "T4", "vram_mb": 16384}],
                "prices": {"T4": 1000},
            },
        ).json()
        job = requester.submit(
            {
                "image": "x",
                "command": ["true"],
                "max_duration_s": 5,
                "resources": {"gpu_models": ["nothing-like-this"]},
            }
        )
        response = httpx.get(
            f"{platform.gateway_url}/v1/agent/jobs/{job['id']}/inputs",
            params={"attempt": 0},
            headers={"Authorization": f"Bearer {joined['credential']}"},
        )
        assert response.status_code == 404
        # A user's access token is not an agent credential, and vice versa.
        response = httpx.get(
            f"{platform.gateway_url}/v1/agent/jobs/{job['id']}/inputs",
            params={"attempt": 0},
            headers={"Authorization": f"Bearer {requester.token}"},
        )
        assert response.status_code == 401
        response = httpx.get(
            f"{platform.gateway_url}/v1/jobs",
            headers={"Authorization": f"Bearer {joined['credential']}"},
        )
        assert response.status_code == 401
        requester.request("POST", f"/v1/jobs/{job['id']}/cancel")
