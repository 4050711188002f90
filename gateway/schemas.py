"""HTTP bodies of the public API that are the gateway's own."""

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

from billing.schemas import Amount
from common.messages import OutputFile
from common.types import SafeStr, Sha256
from provider_registry.schemas import MachineSpec, ProviderOut
from scheduler.schemas import JobOut, JobSpec, relative_path
from storage_service.schemas import UploadedPart

MAX_ARRAY_JOBS = 1000


class FileCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    filename: SafeStr = Field(min_length=1, max_length=255)
    size: int = Field(ge=0)
    # The upload URL then takes only these bytes; the daemon checks them again.
    sha256: Sha256


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
    # None for files registered before checksums were required.
    sha256: str | None = None
    download_url: str


class AgentOutputsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=0)
    files: list[OutputFile] = Field(max_length=10_000)
    # The full log's size, so it counts against the owner's storage quota.
    log_size: int | None = Field(default=None, ge=0)

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, files: list[OutputFile]) -> list[OutputFile]:
        for f in files:
            relative_path(f.path)
        return files


class MultipartUpload(BaseModel):
    """A big output goes up in parts: part n (from 1) is bytes [(n-1) x part_size,
    n x part_size) of the file, PUT to part_urls[n - 1]; then outputs/complete."""

    upload_id: str
    part_size: int
    part_urls: list[str]


class UploadUrl(BaseModel):
    """One output: a single PUT to upload_url, or `multipart` for a big one."""

    path: str
    upload_url: str | None = None
    multipart: MultipartUpload | None = None


class AgentOutputsResponse(BaseModel):
    uploads: list[UploadUrl]
    log_upload_url: str
    # Every URL above works until then (sized to the bytes to send).
    expires_at: datetime | None = None


class AgentUploadRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempt: int = Field(ge=0)
    path: SafeStr = Field(min_length=1, max_length=1024)
    upload_id: SafeStr = Field(min_length=1, max_length=1024)

    @field_validator("path")
    @classmethod
    def _relative(cls, path: str) -> str:
        return relative_path(path)


class AgentCompleteRequest(AgentUploadRef):
    """The parts of a multipart output, all sent: S3 joins them into the object."""

    parts: list[UploadedPart] = Field(min_length=1, max_length=10_000)


class CompletedOutput(BaseModel):
    path: str
    size: int  # as stored


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
