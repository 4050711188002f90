"""`provider-daemon status`, `drain`, `resume` and `leave` against the real platform, and
the offers and fleet metrics the registry serves."""

import asyncio
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import text

from common.db import make_engine
from common.gpu_models import canonical_model
from gpumarket.client import Client
from gpumarket.platform import LocalPlatform
from provider_daemon.config import ProviderConfig, save_config
from provider_daemon.enroll import build_join_request, parse_prices
from provider_daemon.gpus import NvmlGpus, SimulatedGpus
from tests.fixtures.platform import join_machine, new_user
from tests.gateway.test_jobs_api import wait_for
from tests.provider_daemon.recorded_nvml import H100_80GB_HBM3, RTX_4090, RecordedNvml

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
    done = wait_for(requester, job.id, lambda j: j.status in TERMINAL, timeout=120)
    assert done.status == "succeeded"
    local = platform.data_dir / "provider.json"
    result = cli("status", "--config", str(local), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["provider"]["state"] == "online"
    assert status["provider"]["simulated"] is True
    assert all(g["healthy"] for g in status["provider"]["gpus"])
    assert status["tasks_ended"] >= 1 and float(status["earned"]) > 0
    table = cli("status", "--config", str(local))
    assert table.returncode == 0 and "GPUs" in table.stdout and "credits" in table.stdout


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


def join_body(platform: LocalPlatform, owner: Client, inventory_source: object) -> dict:
    token = owner.request("POST", "/v1/providers/join-tokens")["token"]
    inventory = inventory_source.inventory()  # type: ignore[attr-defined]
    return build_join_request(
        token=token,
        machine_id=secrets.token_hex(8),
        name="rig",
        region="eu-west",
        inventory=inventory,
        prices=parse_prices(["H100 80GB HBM3=2.5"], inventory)
        if any("H100" in g.model for g in inventory.gpus)
        else parse_prices([], inventory),
        labels={"tier": "3"},
    )


def test_nvml_and_simulated_inventories_are_stored_as_read(platform: LocalPlatform) -> None:
    owner = new_user(platform, "provider")
    nvml = NvmlGpus(RecordedNvml([H100_80GB_HBM3, RTX_4090]))
    simulated = SimulatedGpus("A100:2", secrets.token_hex(8))
    try:
        for source in (nvml, simulated):
            body = join_body(platform, owner, source)
            response = httpx.post(f"{platform.gateway_url}/v1/providers/join", json=body)
            assert response.status_code == 201, response.text
            stored = owner.request("GET", f"/v1/providers/{response.json()['provider_id']}")
            inventory = source.inventory()
            assert stored["simulated"] is inventory.simulated
            assert stored["driver_version"] == inventory.driver_version
            assert stored["cuda_version"] == inventory.cuda_version
            assert stored["labels"] == {"tier": "3"} and stored["region"] == "eu-west"
            got = [
                (g["uuid"], g["index"], g["model"], g["vram_mb"], g["compute_capability"],
                 g["pcie_gen"], g["pcie_width"], g["simulated"])
                for g in stored["gpus"]
            ]  # fmt: skip
            want = [
                (g.uuid, g.index, canonical_model(g.model), g.vram_mb, g.compute_capability,
                 g.pcie_gen, g.pcie_width, inventory.simulated)
                for g in inventory.gpus
            ]  # fmt: skip
            assert got == want
            if not inventory.simulated:
                # Priced by the platform's spelling of NVML's "NVIDIA H100 80GB HBM3".
                prices = {g["model"]: g["price_per_gpu_hour"] for g in stored["gpus"]}
                assert prices == {"H100 80GB HBM3": "2.500000", "RTX 4090": "0.500000"}
    finally:
        nvml.close()
    # The recorded H100 host as the platform has it: driver, CUDA, PCIe gen 5 x16.
    assert want and nvml.inventory().driver_version == "545.23.08"


def test_join_with_a_used_or_expired_token_is_refused_and_writes_nothing(
    platform: LocalPlatform,
) -> None:
    owner = new_user(platform, "provider")
    body = join_body(platform, owner, SimulatedGpus("T4:1", secrets.token_hex(8)))
    join_url = f"{platform.gateway_url}/v1/providers/join"
    assert httpx.post(join_url, json=body).status_code == 201
    # The same token on another machine: refused.
    other = {**body, "machine_id": secrets.token_hex(8)}
    used = httpx.post(join_url, json=other)
    assert used.status_code == 409 and "token" in used.text
    # An expired one: refused, even for the machine it was first used on.
    expired = join_body(platform, owner, SimulatedGpus("T4:1", secrets.token_hex(8)))
    asyncio.run(_expire_join_tokens(platform))
    gone = httpx.post(join_url, json=expired)
    assert gone.status_code == 410 and "expired" in gone.text
    assert len(owner.request("GET", "/v1/providers")) == 1


async def _expire_join_tokens(platform: LocalPlatform) -> None:
    engine = make_engine(platform.service_env()["GPUMARKET_DATABASE_URL"])
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE join_tokens SET expires_at = now() - interval '1 second'")
            )
    finally:
        await engine.dispose()
