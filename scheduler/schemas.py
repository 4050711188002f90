"""The job spec a requester submits, validated before anything is written."""

import re
from datetime import datetime
from decimal import Decimal
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator

from billing.schemas import JobCost
from common.types import LABEL_KEY_PATTERN, VERSION_PATTERN, SafeStr

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_DURATION_S = 7 * 24 * 3600


def relative_path(value: str) -> str:
    """A path inside /inputs or /outputs: relative, normalised, never escaping."""
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\x00" in value:
        raise ValueError("must be a relative path without '..'")
    return str(path)


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(default=1, ge=1, le=16)
    # "H100" matches any H100 ("H100 80GB HBM3", "H100 PCIe"): every word must appear.
    gpu_models: list[SafeStr] | None = Field(default=None, min_length=1, max_length=16)
    min_vram_gb: float | None = Field(default=None, gt=0, le=1024)
    min_compute_capability: str | None = Field(default=None, pattern=VERSION_PATTERN)
    min_cuda_version: str | None = Field(default=None, pattern=VERSION_PATTERN)
    region: SafeStr | None = Field(default=None, min_length=1, max_length=64)
    # The machine's owner-set labels that must all be present with these values.
    labels: dict[SafeStr, SafeStr] = Field(default_factory=dict, max_length=16)
    # The job's share of the machine: a machine with 32 CPUs and 4 GPUs gives 8 CPUs
    # (and a quarter of its memory) per GPU, as on Vast.ai; these ask for at least that.
    cpus: float | None = Field(default=None, gt=0, le=1024)
    memory_gb: float | None = Field(default=None, gt=0, le=16384)

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not re.fullmatch(LABEL_KEY_PATTERN, key):
                raise ValueError(f"label key {key!r} is not a valid label key")
            if len(value) > 128:
                raise ValueError(f"label {key!r}: value longer than 128 characters")
        return labels


class JobInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_id: SafeStr
    path: str = Field(max_length=1024)

    _path = field_validator("path")(classmethod(lambda cls, v: relative_path(v)))


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: SafeStr = Field(min_length=1, max_length=512)
    command: list[SafeStr] = Field(min_length=1, max_length=256)
    env: dict[SafeStr, SafeStr] = Field(default_factory=dict, max_length=256)
    resources: Resources = Field(default_factory=Resources)
    inputs: list[JobInput] = Field(default_factory=list, max_length=256)
    max_price_per_gpu_hour: Decimal | None = Field(
        default=None, gt=0, max_digits=12, decimal_places=6
    )
    max_duration_s: int = Field(ge=1, le=MAX_DURATION_S)
    priority: int = Field(default=0, ge=-100, le=100)
    # Retries after infrastructure faults (the machine or platform failed, not the job).
    retries: int = Field(default=2, ge=0, le=10)
    # Exit codes that are worth another attempt too (e.g. a flaky download); counted
    # against the same `retries`.
    retry_on_exit_codes: list[int] = Field(default_factory=list, max_length=32)
    # Outbound network access; without it the container has no network at all. Only
    # machines whose owner allows it (label gpumarket/network=egress) take such a job.
    egress: bool = False

    @field_validator("retry_on_exit_codes")
    @classmethod
    def _exit_codes(cls, codes: list[int]) -> list[int]:
        for code in codes:
            if not 1 <= code <= 255:
                raise ValueError(f"{code} is not a failing exit code (1-255)")
        return sorted(set(codes))

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
        return env

    @field_validator("inputs")
    @classmethod
    def _distinct_paths(cls, inputs: list[JobInput]) -> list[JobInput]:
        paths = [i.path for i in inputs]
        if len(paths) != len(set(paths)):
            raise ValueError("two inputs have the same path")
        return inputs


class QueueInfo(BaseModel):
    """Where a queued job stands: an estimate, not a promise."""

    position: int = Field(description="jobs that go before this one (0: next)")
    estimated_start_at: datetime | None = Field(
        description="from the recent placement rate; null while nothing is being placed"
    )


class JobOut(BaseModel):
    id: str
    status: str
    waiting_reason: str | None
    queue: QueueInfo | None = None
    array_id: str | None = None
    array_index: int | None = None
    attempt: int
    provider_id: str | None
    exit_code: int | None
    failure_reason: str | None
    image: str
    command: list[str]
    resources: Resources
    max_price_per_gpu_hour: Decimal | None = Field(
        description="the price ceiling; the platform's default when the spec gave none"
    )
    price_per_gpu_hour: Decimal | None
    gpu_model: str | None = None
    cost: JobCost | None = Field(
        default=None, description="credits held, charged and released (null: not billed)"
    )
    max_duration_s: int
    priority: int
    retries: int
    retry_on_exit_codes: list[int]
    egress: bool = False
    not_before: datetime | None = None
    created_at: datetime
    assigned_at: datetime | None
    accepted_at: datetime | None = None
    started_at: datetime | None
    finished_at: datetime | None
