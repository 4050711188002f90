"""Enrollment: trade a join token for a provider identity over the gateway's HTTP API."""

import json
import math
import os
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError

from common.gpu_models import canonical_model
from common.types import EGRESS_LABEL, RESERVED_LABEL_PREFIX
from provider_daemon.errors import JoinError
from provider_daemon.gpus import Inventory
from provider_daemon.policy import ContainerPolicy

DEFAULT_PRICE_USD_PER_GPU_HOUR = 0.5


class JoinResponse(BaseModel):
    # A response from a newer gateway may carry more; the daemon takes what it knows.
    model_config = ConfigDict(extra="ignore")

    provider_id: str
    credential: str
    nats_url: str
    heartbeat_interval_s: float


def parse_price_items(items: list[str], option: str = "--price") -> dict[str, float]:
    """["MODEL=USD", ...] -> {MODEL: USD} as written; each price a non-negative number."""
    prices: dict[str, float] = {}
    for item in items:
        model, sep, value = item.rpartition("=")
        model = model.strip()
        if not sep or not model:
            raise JoinError(f"{option}: {item!r} is not MODEL=USD_PER_GPU_HOUR")
        try:
            price = float(value)
        except ValueError:
            raise JoinError(f"{option}: {value!r} in {item!r} is not a number") from None
        if not math.isfinite(price) or price < 0:
            raise JoinError(f"{option}: {item!r} must be a non-negative number")
        prices[model] = price
    return prices


def parse_prices(
    items: list[str], inventory: Inventory, saved: dict[str, float] | None = None
) -> dict[str, float]:
    """Turns ["MODEL=USD", ...] into a price for every model here: the one given, else the
    one `saved` by an earlier join or `price set`, else 0.5 USD/GPU-hour.

    Models go by the platform's spelling, so "H100 80GB HBM3=2.5" prices the card NVML
    calls "NVIDIA H100 80GB HBM3".
    """
    models = sorted({canonical_model(g.model) for g in inventory.gpus})
    saved = saved or {}
    prices = {m: saved.get(m, DEFAULT_PRICE_USD_PER_GPU_HOUR) for m in models}
    for model, price in parse_price_items(items).items():
        match = next((m for m in models if m == canonical_model(model)), None)
        if match is None:
            raise JoinError(
                f"--price: no GPU of model {model!r} on this machine (models: {', '.join(models)})"
            )
        prices[match] = price
    return prices


def parse_labels(items: list[str]) -> dict[str, str]:
    """["key=value", ...] -> {key: value}; the platform checks the keys' shape."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise JoinError(f"--label: {item!r} is not KEY=VALUE")
        if key.strip().startswith(RESERVED_LABEL_PREFIX):
            raise JoinError(
                f"--label: keys under {RESERVED_LABEL_PREFIX} are the platform's "
                "(network access is --allow-network)"
            )
        labels[key.strip()] = value.strip()
    return labels


def memory_mb() -> int | None:
    """The machine's physical memory, as the kernel reports it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return None


def build_join_request(
    *,
    token: str,
    machine_id: str,
    name: str,
    region: str | None,
    inventory: Inventory,
    prices: dict[str, float],
    labels: dict[str, str] | None = None,
    policy: ContainerPolicy | None = None,
) -> dict[str, Any]:
    labels = dict(labels or {})
    if policy is not None and policy.network:
        key, value = EGRESS_LABEL
        labels[key] = value
    return {
        "token": token,
        "machine_id": machine_id,
        "name": name,
        "region": region,
        "simulated": inventory.simulated,
        "driver_version": inventory.driver_version,
        "cuda_version": inventory.cuda_version,
        "labels": labels,
        "cpu_count": os.cpu_count(),
        "memory_mb": memory_mb(),
        "gpus": [
            {
                "uuid": g.uuid,
                "index": g.index,
                "model": g.model,
                "vram_mb": g.vram_mb,
                "compute_capability": g.compute_capability,
                "pcie_gen": g.pcie_gen,
                "pcie_width": g.pcie_width,
            }
            for g in inventory.gpus
        ],
        "prices": prices,
    }


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if detail is None:
        return json.dumps(body)[:300]
    return detail if isinstance(detail, str) else json.dumps(detail)[:300]


async def join(api_url: str, body: dict[str, Any], timeout_s: float = 30.0) -> JoinResponse:
    """POSTs /v1/providers/join; raises JoinError with the server's own words on failure."""
    url = api_url.rstrip("/") + "/v1/providers/join"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise JoinError(f"join failed: cannot reach {url}: {exc or type(exc).__name__}") from None
    if response.status_code not in (200, 201):
        raise JoinError(f"join failed: {_detail(response)} (HTTP {response.status_code})")
    try:
        return JoinResponse.model_validate_json(response.content)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"]
        raise JoinError(f"join failed: unexpected response from {url}: {problem}") from None
