"""Message schemas on NATS. Unknown fields are refused so contract drift fails loudly."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobSubmitted(Contract):
    """On jobs.submitted: a wake-up for the scheduler; Postgres holds the job itself."""

    job_id: str
    attempt: int = 0


class TaskInput(Contract):
    file_id: str
    path: str


class TaskAssignment(Contract):
    """On tasks.<provider_id>: run this job attempt on these GPUs."""

    kind: Literal["run"] = "run"
    job_id: str
    attempt: int
    image: str
    command: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    gpu_uuids: list[str]
    inputs: list[TaskInput] = Field(default_factory=list)
    max_duration_s: int
    # The job asked for outbound network access (placed only where the owner allows it).
    egress: bool = False


class TaskCancel(Contract):
    """On tasks.<provider_id>: stop this job attempt if it runs."""

    kind: Literal["cancel"] = "cancel"
    job_id: str
    attempt: int


class OutputFile(Contract):
    path: str
    size: int
    sha256: str


# "exited": the container has ended (its GPUs are free for the next job) while the daemon
# still uploads its results; "finished" follows with the outcome.
EventType = Literal["accepted", "started", "exited", "finished", "rejected"]


class JobEvent(Contract):
    """On events.<provider_id>.<job_id>: a job attempt's lifecycle as the daemon saw it."""

    job_id: str
    attempt: int
    provider_id: str
    type: EventType
    at: datetime
    exit_code: int | None = None
    # For finished: "exited" (the command ran to its end), "timed_out", "cancelled",
    # or "infrastructure" (the platform or the machine failed, not the user's code).
    outcome: Literal["exited", "timed_out", "cancelled", "infrastructure"] | None = None
    reason: str | None = None
    log_tail: str | None = None
    outputs: list[OutputFile] = Field(default_factory=list)
    # For finished: when the container started and ended by the daemon's clock (None if
    # it never ran). The run is billed per second from these, not from `at`, which comes
    # after the outputs were uploaded.
    started_at: datetime | None = None
    ended_at: datetime | None = None


class LogBatch(Contract):
    """On logs.<provider_id>.<job_id>: a few log lines, batched to spare NATS."""

    job_id: str
    attempt: int
    seq: int
    lines: list[str]


PullStatus = Literal["pulling", "done", "failed"]


class PullState(Contract):
    """How far a machine has got in pulling an image."""

    status: PullStatus
    layers_done: int = 0
    layers_total: int = 0
    # Over the layers whose size the engine has told so far, so both may grow.
    bytes_done: int = 0
    bytes_total: int = 0


class PullProgress(PullState):
    """On pulls.<provider_id>.<job_id> (core NATS): the pull of a job attempt's image, at
    most ~2 a second while pulling, then one "done" or "failed"; the gateway passes it
    on as the job's SSE `pull` event."""

    job_id: str
    attempt: int
    image: str


class GpuMetrics(Contract):
    uuid: str
    utilization_pct: float | None = None
    memory_used_mb: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    # Uncorrected ECC errors since the last driver load or GPU reset (None: no ECC).
    ecc_errors: int | None = None
    # Critical XID errors the daemon saw on this GPU since it started.
    xid_errors: int = 0
    # False while the GPU must not take work (uncorrectable ECC, a recent XID error);
    # the reason says which, so the owner knows what to fix.
    healthy: bool = True
    health_reason: str | None = None


class Heartbeat(Contract):
    """On heartbeats.<provider_id>, every few seconds."""

    provider_id: str
    at: datetime
    draining: bool = False
    running_jobs: list[str] = Field(default_factory=list)
    gpus: list[GpuMetrics] = Field(default_factory=list)


class ProviderLost(Contract):
    """On provider.lost.<provider_id> (JetStream): a provider missed its heartbeats for
    the TTL and went offline; the jobs it held must be run elsewhere."""

    provider_id: str
    at: datetime
    last_heartbeat_at: datetime | None
    # Jobs that held GPUs on the provider when it was declared lost.
    job_ids: list[str] = Field(default_factory=list)
