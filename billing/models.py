"""Tables owned by billing: accounts, the ledger, and what each job attempt was metered.

The ledger is double-entry and append-only: a transfer moves an amount from one account
to another as two entries that sum to zero. Triggers (migration 0006) keep each
account's balance equal to the sum of its entries, refuse any update or delete of the
ledger, and refuse a commit whose transfer does not balance.
"""

from datetime import datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
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
)
from sqlalchemy.orm import Mapped, mapped_column

from common.db import Base

# Credits are exact to a millionth; sums of millions of entries still fit.
Money = Numeric(20, 6)

# Account kinds. A requester spends from `available`; submitting moves the job's worst
# case to `held`; settlement pays the provider owner's `earnings` and the platform's
# `fees` from it and gives the rest back. `funding` is where credits enter (admin
# grants, a payment provider): its balance is minus everything ever issued.
AVAILABLE = "available"
HELD = "held"
EARNINGS = "earnings"
FEES = "fees"
FUNDING = "funding"
PLATFORM = "platform"  # owner of the platform's own accounts


class Account(Base):
    __tablename__ = "billing_accounts"
    __table_args__ = (
        UniqueConstraint("kind", "owner_id"),
        # A requester can't spend or hold what it does not have, whatever the code does.
        CheckConstraint("kind NOT IN ('available', 'held') OR balance >= 0", name="no_overdraft"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    owner_id: Mapped[str] = mapped_column(String(36))
    # Maintained by the ledger's trigger only: the sum of this account's entries.
    balance: Mapped[Decimal] = mapped_column(Money, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Transfer(Base):
    __tablename__ = "ledger_transfers"
    __table_args__ = (Index("ix_ledger_transfers_job", "job_id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # Idempotency: "hold:<job>", "charge:<job>:<attempt>", "credit:<reference>", ...
    # A replayed settlement finds its key taken and posts nothing.
    key: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[Decimal] = mapped_column(Money)
    job_id: Mapped[str | None] = mapped_column(String(36))
    attempt: Mapped[int | None] = mapped_column(Integer)
    provider_id: Mapped[str | None] = mapped_column(String(36))
    gpu_model: Mapped[str | None] = mapped_column(String(128))
    memo: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Entry(Base):
    __tablename__ = "ledger_entries"
    __table_args__ = (
        # An account's statement, newest first, paged by id.
        Index("ix_ledger_entries_account", "account_id", "id"),
        CheckConstraint("amount <> 0", name="non_zero"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    transfer_id: Mapped[int] = mapped_column(ForeignKey("ledger_transfers.id"), index=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("billing_accounts.id"))
    amount: Mapped[Decimal] = mapped_column(Money)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Usage(Base):
    """One job attempt as metered: what ran, for how long by whose clock, what it cost."""

    __tablename__ = "job_usage"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt"),
        Index("ix_job_usage_provider_created", "provider_id", "created_at"),
        Index("ix_job_usage_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(36))
    attempt: Mapped[int] = mapped_column(Integer)
    owner_id: Mapped[str] = mapped_column(String(36))
    provider_id: Mapped[str] = mapped_column(String(36))
    provider_owner_id: Mapped[str] = mapped_column(String(36))
    gpu_model: Mapped[str | None] = mapped_column(String(128))
    gpus: Mapped[int] = mapped_column(Integer)
    price_per_gpu_hour: Mapped[Decimal] = mapped_column(Numeric(12, 6))
    # The container's run by the provider's clock, and the platform's window around it.
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    provider_seconds: Mapped[float | None] = mapped_column(Float)
    platform_seconds: Mapped[float | None] = mapped_column(Float)
    # "provider", "platform" (the provider claimed more than the platform saw), or
    # "none" (not billed: an infrastructure fault, or it never started).
    clock: Mapped[str] = mapped_column(String(16))
    billed_seconds: Mapped[int] = mapped_column(Integer)
    chargeable: Mapped[bool] = mapped_column(Boolean)
    cost: Mapped[Decimal] = mapped_column(Money)
    fee: Mapped[Decimal] = mapped_column(Money)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
