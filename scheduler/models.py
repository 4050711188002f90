"""Tables owned by the scheduler: the gateway writes jobs only through job_store."""

import uuid
from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from common.db import Base
from scheduler.states import QUEUED


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # The placement pass scans queued jobs in priority order.
        Index(
            "ix_jobs_queued",
            text("priority DESC"),
            "created_at",
            postgresql_where=text("status = 'queued'"),
        ),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        # Fair share reads each requester's queued jobs in its own priority order...
        Index(
            "ix_jobs_owner_queued",
            "owner_id",
            text("priority DESC"),
            "created_at",
            postgresql_where=text("status = 'queued'"),
        ),
        # ...and how many GPUs each requester holds now.
        Index(
            "ix_jobs_owner_active",
            "owner_id",
            postgresql_where=text("status IN ('assigned', 'running')"),
            postgresql_include=["gpus"],
        ),
        # Deadlines: tasks not accepted in time, runs past max_duration_s, stuck cancels.
        Index(
            "ix_jobs_unfinished_assigned",
            "assigned_at",
            postgresql_where=text("finished_at IS NULL AND provider_id IS NOT NULL"),
        ),
        Index("ix_jobs_array", "array_id", "array_index"),
        # The recent placement rate, for a queued job's estimated start.
        Index("ix_jobs_assigned_at", "assigned_at"),
        # Finished jobs whose hold is not settled yet (the settlement sweep).
        Index(
            "ix_jobs_unsettled",
            "finished_at",
            postgresql_where=text("settled_at IS NULL AND hold_amount IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    owner_id: Mapped[str] = mapped_column(String(36))
    status: Mapped[str] = mapped_column(String(16), default=QUEUED)
    waiting_reason: Mapped[str | None] = mapped_column(Text)
    image: Mapped[str] = mapped_column(String(512))
    command: Mapped[list[str]] = mapped_column(JSONB)
    env: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict)
    gpus: Mapped[int] = mapped_column(Integer)
    gpu_models: Mapped[list[str] | None] = mapped_column(JSONB)
    min_vram_gb: Mapped[float | None] = mapped_column(Float)
    min_compute_capability: Mapped[str | None] = mapped_column(String(16))
    min_cuda_version: Mapped[str | None] = mapped_column(String(16))
    region: Mapped[str | None] = mapped_column(String(64))
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict, server_default="{}")
    cpus: Mapped[float | None] = mapped_column(Float)
    memory_gb: Mapped[float | None] = mapped_column(Float)
    egress: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    inputs: Mapped[list[dict]] = mapped_column(JSONB, default=list)
    max_price_per_gpu_hour: Mapped[Decimal | None] = mapped_column(Numeric(12, 6))
    max_duration_s: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=2)
    # A non-zero exit is the user's failure; these codes ask for a retry anyway.
    retry_on_exit_codes: Mapped[list[int]] = mapped_column(JSONB, default=list, server_default="[]")
    # Job arrays: one batch submission, each job knowing its place in it.
    array_id: Mapped[str | None] = mapped_column(String(36))
    array_index: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    provider_id: Mapped[str | None] = mapped_column(String(36), index=True)
    gpu_uuids: Mapped[list[str]] = mapped_column(JSONB, default=list)
    price_per_gpu_hour: Mapped[Decimal | None] = mapped_column(Numeric(12, 6))
    gpu_model: Mapped[str | None] = mapped_column(String(128))
    # Set aside from the owner's credits at submission (billing/holds.py); null for jobs
    # submitted before billing existed, which are never charged.
    hold_amount: Mapped[Decimal | None] = mapped_column(Numeric(20, 6))
    # Providers an infrastructure fault happened on; a retry avoids them.
    avoid_providers: Mapped[list[str]] = mapped_column(JSONB, default=list)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    log_tail: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # A retry waits out its backoff: no placement before this time.
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    assigned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    accepted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the platform received `started` (JetStream's clock): metering checks the
    # daemon's times against it.
    started_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When the platform asked the daemon to stop it (cancel or time limit).
    stop_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its hold was settled (charges made, the rest released): once per job.
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobOutput(Base):
    __tablename__ = "job_outputs"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "path"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
