"""Tables owned by provider_registry; the scheduler reserves GPUs through capacity.py."""

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    Numeric,
    String,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from common.db import Base

ONLINE = "online"
OWNER_DISABLED = "owner disabled"
CREDENTIAL_REVOKED = "credential revoked"
OFFLINE = "offline"
DRAINING = "draining"


class Provider(Base):
    __tablename__ = "providers"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(36), index=True)
    machine_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    region: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=ONLINE)
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    driver_version: Mapped[str | None] = mapped_column(String(64))
    cuda_version: Mapped[str | None] = mapped_column(String(32))
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Set while the machine may take no work whatever its heartbeats say: its owner was
    # disabled, or its credential was revoked (then for good: it joins again as a new one).
    suspended_reason: Mapped[str | None] = mapped_column(String(32))
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
    price_per_hour: Mapped[Decimal] = mapped_column(Numeric(12, 6))
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)
    # The one job that owns this GPU now; set and cleared only inside a row lock.
    reserved_job_id: Mapped[str | None] = mapped_column(String(36), index=True)
    utilization_pct: Mapped[float | None] = mapped_column(Float)
    memory_used_mb: Mapped[int | None] = mapped_column(Integer)
    temperature_c: Mapped[float | None] = mapped_column(Float)
    power_w: Mapped[float | None] = mapped_column(Float)
    metrics_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    provider: Mapped[Provider] = relationship(back_populates="gpus")
