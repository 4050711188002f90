"""A provider changes its prices after joining: by REST as the owner or an admin, by the
daemon's credential, and with `provider-daemon price set`, against the real platform."""

import contextlib
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from gpumarket.client import ApiError, Client
from gpumarket.platform import LocalPlatform
from tests.fixtures.platform import client_address, join_machine, new_user
from tests.gateway.test_jobs_api import job_spec, wait_for
from tests.gateway.test_provider_lifecycle import cli, config_for

# Every test job has a price cap of 1 (job_spec): daemon-less machines stay priced above
# it, so nothing is ever placed on them.
HIGH = 2.5


@pytest.fixture
def owner(platform: LocalPlatform) -> Client:
    return new_user(platform, "provider")


@pytest.fixture
def machine(platform: LocalPlatform, owner: Client) -> Iterator[dict]:
    """A daemon-less T4 machine of `owner`, drained at the end so it stays off the market."""
    joined = join_machine(platform, owner, model="T4")
    yield joined
    owner.request("POST", f"/v1/providers/{joined['provider_id']}/drain")


def set_prices(client: Client, provider_id: str, body: object) -> dict:
    return client.request("PUT", f"/v1/providers/{provider_id}/prices", json=body)


def gpu_prices(client: Client, provider_id: str) -> list[str]:
    provider = client.request("GET", f"/v1/providers/{provider_id}")
    return [g["price_per_gpu_hour"] for g in provider["gpus"]]


def refused(call, status: int) -> dict:  # type: ignore[no-untyped-def]
    with pytest.raises(ApiError) as err:
        call()
    assert err.value.status_code == status, err.value.body
    return err.value.body


class TestOwnerSetsPrices:
    def test_new_price_is_on_the_market(self, owner: Client, machine: dict) -> None:
        pid = machine["provider_id"]
        # Matched by the platform's spelling, as at join: "Tesla T4" is "T4".
        out = set_prices(owner, pid, {"prices": {"Tesla T4": HIGH}})
        assert [g["price_per_gpu_hour"] for g in out["gpus"]] == ["2.500000"]
        assert gpu_prices(owner, pid) == ["2.500000"]
        page = owner.request("GET", "/v1/offers", params={"model": "T4", "limit": 500})
        (offer,) = [o for o in page["offers"] if o["provider_id"] == pid]
        assert offer["price_per_gpu_hour"] == "2.500000"

    def test_unknown_model_changes_nothing(self, owner: Client, machine: dict) -> None:
        pid = machine["provider_id"]
        body = refused(lambda: set_prices(owner, pid, {"prices": {"T4": HIGH, "A100": 3}}), 422)
        assert [e["field"] for e in body["errors"]] == ["prices.A100"]
        assert "no GPU of model 'A100'" in body["detail"] and "T4" in body["detail"]
        assert gpu_prices(owner, pid) == ["1000.000000"]

    @pytest.mark.parametrize(
        ("prices", "field"),
        [
            ({"T4": -1}, "prices.T4"),
            ({"T4": 1e30}, "prices.T4"),
            ({"T4": 100_001}, "prices.T4"),
            ({"T4": 0.1234567}, "prices.T4"),
            ({"T4": "cheap"}, "prices.T4"),
            ({"T4": None}, "prices.T4"),
            ({}, "prices"),
            ({"T\x00": 1}, "prices"),
        ],
    )
    def test_bad_price_is_422(self, owner: Client, machine: dict, prices: dict, field: str) -> None:
        pid = machine["provider_id"]
        body = refused(lambda: set_prices(owner, pid, {"prices": prices}), 422)
        assert body["errors"][0]["field"].startswith(field), body
        assert gpu_prices(owner, pid) == ["1000.000000"]

    @pytest.mark.parametrize(
        "raw", [b'{"prices": {"T4": NaN}}', b'{"prices": {"T4": Infinity}}', b'{"T4": 2}', b"{"]
    )
    def test_odd_bodies_are_422(
        self, platform: LocalPlatform, owner: Client, machine: dict, raw: bytes
    ) -> None:
        response = httpx.put(
            f"{platform.gateway_url}/v1/providers/{machine['provider_id']}/prices",
            content=raw,
            headers={"Authorization": f"Bearer {owner.token}", "Content-Type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert response.json()["errors"][0]["field"]

    def test_someone_elses_machine_is_not_found(
        self, platform: LocalPlatform, owner: Client, machine: dict
    ) -> None:
        pid = machine["provider_id"]
        other = new_user(platform, "provider")
        for target in (pid, "not-a-uuid"):
            refused(lambda t=target: set_prices(other, t, {"prices": {"T4": HIGH}}), 404)
        # Not found before the model is looked at: nothing about the machine leaks.
        refused(lambda: set_prices(other, pid, {"prices": {"A100": HIGH}}), 404)
        refused(lambda: set_prices(new_user(platform), pid, {"prices": {"T4": HIGH}}), 403)
        assert gpu_prices(owner, pid) == ["1000.000000"]

    def test_admin_can_set_any_machines_prices(
        self, admin: Client, owner: Client, machine: dict
    ) -> None:
        pid = machine["provider_id"]
        set_prices(admin, pid, {"prices": {"T4": 3.75}})
        assert gpu_prices(owner, pid) == ["3.750000"]

    def test_a_machine_that_left_is_refused(
        self, platform: LocalPlatform, owner: Client, machine: dict
    ) -> None:
        pid = machine["provider_id"]
        agent = {"Authorization": f"Bearer {machine['credential']}"}
        left = httpx.post(f"{platform.gateway_url}/v1/agent/provider/leave", headers=agent)
        assert left.status_code == 200, left.text
        body = refused(lambda: set_prices(owner, pid, {"prices": {"T4": HIGH}}), 409)
        assert "left" in body["detail"]


def test_daemon_credential_sets_its_own_prices(
    platform: LocalPlatform, owner: Client, machine: dict
) -> None:
    url = f"{platform.gateway_url}/v1/agent/provider/prices"
    agent = {"Authorization": f"Bearer {machine['credential']}"}
    done = httpx.put(url, json={"prices": {"T4": 4.2}}, headers=agent)
    assert done.status_code == 200, done.text
    assert done.json()["id"] == machine["provider_id"]
    assert gpu_prices(owner, machine["provider_id"]) == ["4.200000"]
    bad = httpx.put(url, json={"prices": {"H100": 4.2}}, headers=agent)
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "prices.H100"
    nobody = httpx.put(url, json={"prices": {"T4": 4.2}}, headers={"Authorization": "Bearer x"})
    assert nobody.status_code == 401
    # A user's token is not a machine's credential.
    as_user = httpx.put(
        url, json={"prices": {"T4": 4.2}}, headers={"Authorization": f"Bearer {owner.token}"}
    )
    assert as_user.status_code == 401
    assert gpu_prices(owner, machine["provider_id"]) == ["4.200000"]


def test_cli_price_set_and_show(
    platform: LocalPlatform, owner: Client, machine: dict, tmp_path: Path
) -> None:
    config = config_for(platform, machine, tmp_path / "provider.json")
    done = cli("price", "set", "t4=2.75", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "T4" in done.stdout and "2.750000" in done.stdout
    assert gpu_prices(owner, machine["provider_id"]) == ["2.750000"]
    # The saved config follows, so joining again keeps the new price.
    assert json.loads(config.read_text())["prices"] == {"T4": 2.75}
    shown = cli("price", "show", "--config", str(config), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"T4": "2.750000"}

    for args, message in (
        (["A100=3"], "no GPU of model 'A100'"),
        (["T4"], "price set: 'T4' is not MODEL=USD_PER_GPU_HOUR"),
        (["T4=-2"], "must be a non-negative number"),
        (["T4=1e30"], "prices.T4"),
    ):
        result = cli("price", "set", *args, "--config", str(config))
        assert result.returncode == 1, result
        lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    assert gpu_prices(owner, machine["provider_id"]) == ["2.750000"]
    assert json.loads(config.read_text())["prices"] == {"T4": 2.75}


def test_a_job_placed_after_a_change_pays_the_new_price(
    platform: LocalPlatform, requester: Client
) -> None:
    """On the local daemon's machine (two RTX 4090s): a running task keeps the price it
    was placed at, the next one pays the new price."""
    local = Client(platform.gateway_url, headers={"X-Forwarded-For": client_address()})
    local.login("provider@example.com", "sells-gpu-time-1")
    pid = json.loads((platform.data_dir / "provider.json").read_text())["provider_id"]
    (before,) = set(gpu_prices(local, pid))
    new = "0.750000" if before != "0.750000" else "0.800000"
    spec = {"resources": {"gpus": 1, "gpu_models": ["RTX 4090"]}}
    running = requester.submit(job_spec(["sleep", "60"], **spec))
    try:
        placed = wait_for(requester, running.id, lambda j: j.status == "running", 120)
        assert placed.provider_id == pid and placed.price_per_gpu_hour == Decimal(before)
        set_prices(local, pid, {"prices": {"RTX 4090": new}})
        after = requester.submit(job_spec(["true"], **spec))
        # The price is the job's from the moment it is placed.
        placed = wait_for(requester, after.id, lambda j: j.provider_id is not None, 120)
        assert placed.provider_id == pid and placed.price_per_gpu_hour == Decimal(new)
        assert requester.job(running.id).price_per_gpu_hour == Decimal(before)
    finally:
        with contextlib.suppress(ApiError):
            requester.cancel(running.id)
        set_prices(local, pid, {"prices": {"RTX 4090": before}})
