"""`provider-daemon status`, `drain`, `resume` and `leave` against the real platform, and
the offers and fleet metrics the registry serves."""

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gpumarket.client import Client
from gpumarket.platform import LocalPlatform
from provider_daemon.config import ProviderConfig, save_config
from tests.fixtures.platform import join_machine, new_user
from tests.gateway.test_jobs_api import wait_for

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provider_daemon", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def config_for(platform: LocalPlatform, joined: dict, path: Path) -> Path:
    save_config(
        ProviderConfig(
            api_url=platform.gateway_url,
            machine_id="m",
            name="m",
            provider_id=joined["provider_id"],
            credential=joined["credential"],
            nats_url=joined["nats_url"],
        ),
        path,
    )
    return path


def test_status_shows_what_the_platform_sees_with_earnings(
    platform: LocalPlatform, requester: Client
) -> None:
    job = requester.submit(
        {
            "image": "localhost/gpumarket-sample:latest",
            "command": ["sleep", "1"],
            "max_duration_s": 60,
        }
    )
    done = wait_for(requester, job["id"], lambda j: j["status"] in TERMINAL, timeout=120)
    assert done["status"] == "succeeded"
    local = platform.data_dir / "provider.json"
    result = cli("status", "--config", str(local), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["provider"]["state"] == "online"
    assert status["provider"]["simulated"] is True
    assert all(g["healthy"] for g in status["provider"]["gpus"])
    assert status["tasks_ended"] >= 1 and float(status["earned_usd"]) > 0
    table = cli("status", "--config", str(local))
    assert table.returncode == 0 and "GPUs" in table.stdout and "USD" in table.stdout


def test_drain_resume_and_leave_for_good(platform: LocalPlatform, tmp_path: Path) -> None:
    owner = new_user(platform, "provider")
    joined = join_machine(platform, owner)
    config = config_for(platform, joined, tmp_path / "provider.json")

    def state() -> str:
        return owner.request("GET", f"/v1/providers/{joined['provider_id']}")["state"]

    assert cli("drain", "--config", str(config), "--wait").returncode == 0
    assert state() == "draining"
    # A drained machine is not on the market.
    page = owner.request("GET", "/v1/offers", params={"model": "T4", "limit": 500})
    assert joined["provider_id"] not in [o["provider_id"] for o in page["offers"]]
    assert cli("resume", "--config", str(config)).returncode == 0
    assert state() == "online"

    left = cli("leave", "--config", str(config), "--yes")
    assert left.returncode == 0, left.stderr
    assert not config.exists()
    assert owner.request("GET", "/v1/providers") == []
    # Its credential ended with it.
    config_for(platform, joined, config)
    after = cli("status", "--config", str(config))
    assert after.returncode == 3 and "no longer accepts" in after.stderr


def test_offers_api_filters_sorts_and_pages(platform: LocalPlatform) -> None:
    owner = new_user(platform, "provider")
    mine = {join_machine(platform, owner, model="L40S")["provider_id"] for _ in range(3)}
    user = new_user(platform)
    first = user.request("GET", "/v1/offers", params={"model": "L40S", "limit": 2})
    second = user.request("GET", "/v1/offers", params={"model": "L40S", "limit": 2, "offset": 2})
    assert first["total"] == 3 and len(first["offers"]) == 2 and len(second["offers"]) == 1
    assert {o["provider_id"] for o in first["offers"] + second["offers"]} == mine
    assert all(o["simulated"] and o["reliability"] == 1.0 for o in first["offers"])
    none = user.request("GET", "/v1/offers", params={"model": "L40S", "min_gpus": 2})
    assert none == {"offers": [], "total": 0, "limit": 50, "offset": 0}
    with httpx.Client(base_url=platform.gateway_url) as http:
        headers = {"Authorization": f"Bearer {user.token}"}
        for params, field in (
            ({"min_compute_capability": "eight"}, "min_compute_capability"),
            ({"sort": "cheapest"}, "sort"),
            ({"label": "no-equals-sign"}, "label"),
            ({"limit": 0}, "limit"),
            ({"min_reliability": 2}, "min_reliability"),
            ({"colour": "red"}, "colour"),
        ):
            response = http.get("/v1/offers", params=params, headers=headers)
            assert response.status_code == 422, params
            assert field in json.dumps(response.json()), response.text


def test_registry_exports_fleet_metrics(platform: LocalPlatform) -> None:
    url = f"http://127.0.0.1:{platform.port('provider_registry')}/metrics"
    deadline = time.monotonic() + 30
    text = httpx.get(url, follow_redirects=True).text
    # The fleet snapshot refreshes every few seconds.
    while "gpumarket_gpu_utilization_percent{" not in text and time.monotonic() < deadline:
        time.sleep(0.5)
        text = httpx.get(url, follow_redirects=True).text
    assert 'gpumarket_providers{state="online"}' in text
    assert "gpumarket_gpu_utilization_percent{" in text
    assert "registry_heartbeat_ingest_lag_seconds_bucket" in text
