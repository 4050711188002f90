from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.types import Price, SafeStr


class GpuSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uuid: SafeStr = Field(min_length=1, max_length=96)
    index: int = Field(ge=0)
    model: SafeStr = Field(min_length=1, max_length=128)
    vram_mb: int = Field(gt=0)
    compute_capability: SafeStr | None = Field(default=None, max_length=16)


class MachineSpec(BaseModel):
    """What a daemon reports about its machine when it joins."""

    model_config = ConfigDict(extra="forbid")

    machine_id: SafeStr = Field(min_length=1, max_length=64)
    name: SafeStr = Field(min_length=1, max_length=128)
    region: SafeStr | None = Field(default=None, max_length=64)
    simulated: bool = False
    driver_version: SafeStr | None = Field(default=None, max_length=64)
    cuda_version: SafeStr | None = Field(default=None, max_length=32)
    gpus: list[GpuSpec] = Field(min_length=1, max_length=64)
    prices: dict[SafeStr, Price] = Field(default_factory=dict)

    @field_validator("gpus")
    @classmethod
    def _distinct_gpus(cls, gpus: list[GpuSpec]) -> list[GpuSpec]:
        if len({g.uuid for g in gpus}) != len(gpus):
            raise ValueError("two GPUs have the same uuid")
        return gpus


class ProviderRegistration(MachineSpec):
    provider_id: SafeStr
    owner_id: SafeStr


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
    # Why the machine takes no work, if it doesn't: "owner disabled" or "credential revoked".
    suspended_reason: str | None = None
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


class Suspended(BaseModel):
    providers: int
