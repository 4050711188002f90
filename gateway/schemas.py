"""HTTP bodies of the public API that are the gateway's own."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from billing.schemas import Amount
from common.messages import OutputFile
from common.types import SafeStr
from provider_registry.schemas import MachineSpec, ProviderOut
from scheduler.schemas import JobOut, JobSpec, relative_path

MAX_ARRAY_JOBS = 1000


class FileCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: SafeStr = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)


class JobArrayRequest(BaseModel):
    """A job array: either `jobs` (one spec per job) or `template` with `count` copies."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[JobSpec] | None = Field(default=None, min_length=1, max_length=MAX_ARRAY_JOBS)
    template: JobSpec | None = None
    count: int | None = Field(default=None, ge=1, le=MAX_ARRAY_JOBS)


class LogLine(BaseModel):
    """The SSE `log` event: one line the job wrote."""

    attempt: int
    line: str


class StreamEnd(BaseModel):
    """The SSE `end` event: the job is over and every line was sent."""

    status: str


class JobArrayOut(BaseModel):
    array_id: str
    count: int
    jobs: list[JobOut]


class JoinRequest(MachineSpec):
    token: str = Field(min_length=1, max_length=256)


class JoinResponse(BaseModel):
    provider_id: str
    credential: str
    nats_url: str
    heartbeat_interval_s: float


class AgentInput(BaseModel):
    file_id: str
    path: str
    size: int
    download_url: str


class AgentOutputsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=0)
    files: list[OutputFile] = Field(max_length=10_000)

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: list[OutputFile]) -> list[OutputFile]:
        for f in files:
            relative_path(f.path)
        return files


class UploadUrl(BaseModel):
    path: str
    upload_url: str


class AgentOutputsResponse(BaseModel):
    uploads: list[UploadUrl]
    log_upload_url: str


class OutputOut(BaseModel):
    path: str
    size: int
    sha256: str
    download_url: str
    expires_at: datetime


class RunningTask(BaseModel):
    job_id: str
    attempt: int
    status: str
    gpu_uuids: list[str]
    assigned_at: datetime | None
    started_at: datetime | None


class ProviderStatus(BaseModel):
    """What the platform sees of one machine: `provider-daemon status`."""

    provider: ProviderOut
    running_tasks: list[RunningTask]
    tasks_ended: int
    # Credits this machine earned (from the ledger), after the platform's fee; attempts
    # that ended in an infrastructure fault earn nothing.
    earned: Amount
