from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class GpuSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uuid: str = Field(min_length=1, max_length=96)
    index: int = Field(ge=0)
    model: str = Field(min_length=1, max_length=128)
    vram_mb: int = Field(gt=0)
    compute_capability: str | None = Field(default=None, max_length=16)


class MachineSpec(BaseModel):
    """What a daemon reports about its machine when it joins."""

    model_config = ConfigDict(extra="forbid")

    machine_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=128)
    region: str | None = Field(default=None, max_length=64)
    simulated: bool = False
    driver_version: str | None = Field(default=None, max_length=64)
    cuda_version: str | None = Field(default=None, max_length=32)
    gpus: list[GpuSpec] = Field(min_length=1, max_length=64)
    prices: dict[str, Decimal] = Field(default_factory=dict)

    @field_validator("prices")
    @classmethod
    def _positive_prices(cls, prices: dict[str, Decimal]) -> dict[str, Decimal]:
        for model, price in prices.items():
            if price < 0:
                raise ValueError(f"price for {model!r} must not be negative")
        return prices

    @field_validator("gpus")
    @classmethod
    def _distinct_gpus(cls, gpus: list[GpuSpec]) -> list[GpuSpec]:
        if len({g.uuid for g in gpus}) != len(gpus):
            raise ValueError("two GPUs have the same uuid")
        return gpus


class ProviderRegistration(MachineSpec):
    provider_id: str
    owner_id: str


class GpuOut(BaseModel):
    uuid: str
    index: int
    model: str
    vram_mb: int
    compute_capability: str | None
    price_per_gpu_hour: Decimal
    simulated: bool
    busy: bool
    utilization_pct: float | None
    memory_used_mb: int | None
    temperature_c: float | None
    power_w: float | None


class ProviderOut(BaseModel):
    id: str
    name: str
    region: str | None
    state: str
    simulated: bool
    last_heartbeat_at: datetime | None
    created_at: datetime
    gpus: list[GpuOut]


class Offer(BaseModel):
    provider_id: str
    provider_name: str
    region: str | None
    model: str
    vram_gb: float
    price_per_gpu_hour: Decimal
    free_gpus: int
    simulated: bool
