import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.types import LABEL_KEY_PATTERN, VERSION_PATTERN, Price, SafeStr

OfferSort = Literal[
    "price", "-price", "reliability", "-reliability", "vram", "-vram", "free_gpus", "-free_gpus"
]


class GpuSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uuid: SafeStr = Field(min_length=1, max_length=96)
    index: int = Field(ge=0)
    model: SafeStr = Field(min_length=1, max_length=128)
    vram_mb: int = Field(gt=0)
    compute_capability: SafeStr | None = Field(default=None, max_length=16, pattern=r"^\d+\.\d+$")
    # The PCIe link this GPU can reach in this machine (generation, lanes).
    pcie_gen: int | None = Field(default=None, ge=1, le=16)
    pcie_width: int | None = Field(default=None, ge=1, le=64)


LABEL_KEY = LABEL_KEY_PATTERN


class MachineSpec(BaseModel):
    """What a daemon reports about its machine when it joins."""

    model_config = ConfigDict(extra="forbid")

    machine_id: SafeStr = Field(min_length=1, max_length=64)
    name: SafeStr = Field(min_length=1, max_length=128)
    region: SafeStr | None = Field(default=None, max_length=64)
    simulated: bool = False
    driver_version: SafeStr | None = Field(default=None, max_length=64)
    cuda_version: SafeStr | None = Field(default=None, max_length=32, pattern=r"^\d+\.\d+$")
    # Owner-chosen facts a job can require (e.g. "datacenter": "tier3", "nvlink": "yes").
    labels: dict[SafeStr, SafeStr] = Field(default_factory=dict, max_length=32)
    # The machine's CPUs and memory; each job gets its GPUs' share of them.
    cpu_count: int | None = Field(default=None, ge=1, le=4096)
    memory_mb: int | None = Field(default=None, ge=1, le=64 * 1024 * 1024)
    gpus: list[GpuSpec] = Field(min_length=1, max_length=64)
    prices: dict[SafeStr, Price] = Field(default_factory=dict)

    @field_validator("labels")
    @classmethod
    def _label_shape(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not re.fullmatch(LABEL_KEY, key):
                raise ValueError(
                    f"label key {key!r} must be 1-64 lowercase letters, digits, '.', '_', '-' "
                    "or '/', starting and ending with a letter or digit"
                )
            if len(value) > 128:
                raise ValueError(f"label {key!r}: value longer than 128 characters")
        return labels

    @field_validator("gpus")
    @classmethod
    def _distinct_gpus(cls, gpus: list[GpuSpec]) -> list[GpuSpec]:
        if len({g.uuid for g in gpus}) != len(gpus):
            raise ValueError("two GPUs have the same uuid")
        return gpus


class ProviderRegistration(MachineSpec):
    provider_id: SafeStr
    owner_id: SafeStr


class PriceChange(BaseModel):
    """New prices per GPU-hour by GPU model (spelt as at join); the models not named keep
    theirs."""

    model_config = ConfigDict(extra="forbid")

    prices: dict[Annotated[SafeStr, Field(min_length=1, max_length=128)], Price] = Field(
        min_length=1, max_length=64
    )


class GpuOut(BaseModel):
    uuid: str
    index: int
    model: str
    vram_mb: int
    compute_capability: str | None
    pcie_gen: int | None
    pcie_width: int | None
    price_per_gpu_hour: Decimal
    simulated: bool
    busy: bool
    healthy: bool
    health_reason: str | None
    utilization_pct: float | None
    memory_used_mb: int | None
    temperature_c: float | None
    power_w: float | None
    ecc_errors: int | None
    xid_errors: int
    metrics_at: datetime | None


class ProviderOut(BaseModel):
    id: str
    name: str
    region: str | None
    labels: dict[str, str]
    # online, draining (by its owner, or by the daemon), offline, or left.
    state: str
    drain_requested: bool
    # Why the machine takes no work, if it doesn't: "owner disabled" or "credential revoked".
    suspended_reason: str | None = None
    simulated: bool
    driver_version: str | None
    cuda_version: str | None
    cpu_count: int | None = None
    memory_mb: int | None = None
    reliability: float
    uptime: float
    last_heartbeat_at: datetime | None
    created_at: datetime
    gpus: list[GpuOut]


class Offer(BaseModel):
    provider_id: str
    provider_name: str
    region: str | None
    labels: dict[str, str]
    model: str
    vram_gb: float
    compute_capability: str | None
    cuda_version: str | None
    driver_version: str | None
    pcie_gen: int | None
    pcie_width: int | None
    price_per_gpu_hour: Decimal
    free_gpus: int
    total_gpus: int
    reliability: float
    simulated: bool


class OfferPage(BaseModel):
    offers: list[Offer]
    # Offers matching the filters, over every page.
    total: int
    limit: int
    offset: int


class Suspended(BaseModel):
    providers: int


VERSION = VERSION_PATTERN


class OfferFilters(BaseModel):
    """The market's search, as query parameters (`?model=H100&model=A100&min_gpus=2`)."""

    model_config = ConfigDict(extra="forbid")

    model: list[SafeStr] = Field(default_factory=list, max_length=16)
    min_vram_gb: float | None = Field(default=None, gt=0, le=4096)
    min_compute_capability: str | None = Field(default=None, pattern=VERSION)
    min_cuda_version: str | None = Field(default=None, pattern=VERSION)
    max_price: Decimal | None = Field(default=None, gt=0, le=100_000, allow_inf_nan=False)
    region: list[SafeStr] = Field(default_factory=list, max_length=16)
    min_reliability: float | None = Field(default=None, ge=0, le=1)
    min_gpus: int = Field(default=1, ge=1, le=64)
    # "key=value", every one required.
    label: list[SafeStr] = Field(default_factory=list, max_length=16)
    sort: OfferSort = "price"
    limit: int = Field(default=50, ge=1, le=500)
    offset: int = Field(default=0, ge=0, le=1_000_000)

    @field_validator("label")
    @classmethod
    def _label_pairs(cls, labels: list[str]) -> list[str]:
        for item in labels:
            key, sep, _ = item.partition("=")
            if not sep or not re.fullmatch(LABEL_KEY, key):
                raise ValueError(f"{item!r} is not key=value with a valid label key")
        return labels

    def labels(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.label)
