"""The job spec a requester submits, validated before anything is written."""

import re
from datetime import datetime
from decimal import Decimal
from pathlib import PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.types import SafeStr

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
    gpu_models: list[SafeStr] | None = Field(default=None, min_length=1, max_length=16)
    min_vram_gb: float | None = Field(default=None, gt=0, le=1024)


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
    retries: int = Field(default=2, ge=0, le=10)

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


class JobOut(BaseModel):
    id: str
    status: str
    waiting_reason: str | None
    attempt: int
    provider_id: str | None
    exit_code: int | None
    failure_reason: str | None
    image: str
    command: list[str]
    resources: Resources
    max_price_per_gpu_hour: Decimal | None
    price_per_gpu_hour: Decimal | None
    max_duration_s: int
    created_at: datetime
    assigned_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
