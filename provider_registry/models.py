"""Tables owned by provider_registry; the scheduler reserves GPUs through capacity.py."""

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    Numeric,
    Sequence,
    String,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from common.db import Base

ONLINE = "online"
OWNER_DISABLED = "owner disabled"
CREDENTIAL_REVOKED = "credential revoked"
OFFLINE = "offline"
DRAINING = "draining"
# The owner took the machine off the platform for good; its history stays.
LEFT = "left"

# One counter for every change that matters to placement (see capacity_seq below).
CAPACITY_SEQ = Sequence("capacity_seq", metadata=Base.metadata)
# The current transaction's id, comparable with pg_snapshot_xmin() cast the same way.
CURRENT_XID = "pg_current_xact_id()::text::bigint"


class Provider(Base):
    __tablename__ = "providers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(36), index=True)
    machine_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    region: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=ONLINE)
    # The owner asked for no new work (`provider-daemon drain`); heartbeats can't undo it.
    drain_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, default=dict, server_default="{}")
    # From uptime and task outcomes over a sliding window; see reliability.py.
    reliability: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    uptime: Mapped[float] = mapped_column(Float, default=1.0, server_default="1")
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    driver_version: Mapped[str | None] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(32))
    cpu_count: Mapped[int | None] = mapped_column(Integer)
    memory_mb: Mapped[int | None] = mapped_column(BigInteger)
    # Bumped by a trigger whenever anything placement depends on changes, so schedulers
    # refresh their in-memory view of the fleet from the rows changed since they looked.
    capacity_seq: Mapped[int] = mapped_column(
        BigInteger, server_default=CAPACITY_SEQ.next_value(), index=True
    )
    # The transaction that set capacity_seq (its xid8, as a bigint): a refresh re-reads
    # the rows written by transactions that had not ended at its last look.
    capacity_xid: Mapped[int] = mapped_column(
        BigInteger, server_default=text(CURRENT_XID), index=True
    )
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set while the machine may take no work whatever its heartbeats say: its owner was
    # disabled, or its credential was revoked (then for good: it joins again as a new one).
    suspended_reason: Mapped[str | None] = mapped_column(String(32))
    left_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    gpus: Mapped[list["Gpu"]] = relationship(
        back_populates="provider", order_by="Gpu.index", cascade="all, delete-orphan"
    )


class Gpu(Base):
    __tablename__ = "gpus"
    __table_args__ = (UniqueConstraint("provider_id", "uuid"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    provider_id: Mapped[str] = mapped_column(
        ForeignKey("providers.id", ondelete="CASCADE"), index=True
    )
    uuid: Mapped[str] = mapped_column(String(96))
    index: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(128), index=True)
    vram_mb: Mapped[int] = mapped_column(Integer)
    compute_capability: Mapped[str | None] = mapped_column(String(16))
    pcie_gen: Mapped[int | None] = mapped_column(Integer)
    pcie_width: Mapped[int | None] = mapped_column(Integer)
    price_per_hour: Mapped[Decimal] = mapped_column(Numeric(12, 6))
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    # The one job that owns this GPU now; set and cleared only inside a row lock.
    reserved_job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    utilization_pct: Mapped[float | None] = mapped_column(Float)
    memory_used_mb: Mapped[int | None] = mapped_column(Integer)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    power_w: Mapped[float | None] = mapped_column(Float)
    ecc_errors: Mapped[int | None] = mapped_column(Integer)
    xid_errors: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # As the daemon last judged it; an unhealthy GPU is neither offered nor reserved.
    healthy: Mapped[bool] = mapped_column(Boolean, default=True, server_default="true")
    health_reason: Mapped[str | None] = mapped_column(String(256))
    metrics_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    capacity_seq: Mapped[int] = mapped_column(
        BigInteger, server_default=CAPACITY_SEQ.next_value(), index=True
    )
    capacity_xid: Mapped[int] = mapped_column(
        BigInteger, server_default=text(CURRENT_XID), index=True
    )

    provider: Mapped[Provider] = relationship(back_populates="gpus")


class ProviderOutage(Base):
    """A span during which a provider was offline; open while ended_at is null.

    Uptime comes from these, and `lost_published` makes the provider.lost event an
    outbox entry: published at least once even if NATS was down when the outage began.
    """

    __tablename__ = "provider_outages"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    provider_id: Mapped[str] = mapped_column(
        ForeignKey("providers.id", ondelete="CASCADE"), index=True
    )
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    job_ids: Mapped[list[str]] = mapped_column(JSONB, default=list, server_default="[]")
    lost_published: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")


class ProviderTaskDay(Base):
    """How a provider's tasks ended, per day: the other half of its reliability."""

    __tablename__ = "provider_task_days"

    provider_id: Mapped[str] = mapped_column(
        ForeignKey("providers.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    ok: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    infrastructure: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
