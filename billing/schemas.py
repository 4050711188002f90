"""Billing's REST shapes. Amounts are credits exact to a millionth, written in JSON as
decimal strings with six places ("12.500000"), so no client rounds money through a float."""

from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from billing.amounts import credits
from common.types import SafeStr

AccountName = Literal["available", "held", "earnings"]
Amount = Annotated[
    Decimal, PlainSerializer(lambda d: f"{credits(d):f}", return_type=str, when_used="json")
]

# What one top-up may add.
CreditAmount = Annotated[Decimal, Field(gt=0, le=1_000_000_000, max_digits=16, decimal_places=6)]


class CreditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: SafeStr = Field(min_length=1, max_length=36)
    amount: CreditAmount
    # Credits once per reference: a retried top-up (or payment webhook) changes nothing.
    reference: SafeStr | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$"
    )
    memo: SafeStr | None = Field(default=None, max_length=500)


class CreditOut(BaseModel):
    user_id: str
    amount: Amount
    reference: str
    credited: bool = Field(description="false: this reference was credited before")
    balance: Amount


class BalanceOut(BaseModel):
    currency: Literal["credits"] = "credits"
    available: Amount = Field(description="what new jobs can hold")
    held: Amount = Field(description="set aside for unfinished jobs")
    earnings: Amount = Field(description="earned by the caller's machines, after fees")


class LedgerEntryOut(BaseModel):
    id: int
    at: datetime
    account: str
    kind: str = Field(description="credit, hold, charge, fee or release")
    amount: Amount = Field(description="into the account (positive) or out of it")
    job_id: str | None
    attempt: int | None
    provider_id: str | None
    gpu_model: str | None
    memo: str | None


class LedgerPage(BaseModel):
    entries: list[LedgerEntryOut]
    next_before: int | None = Field(description="pass as `before` for the next page")


class JobCost(BaseModel):
    currency: Literal["credits"] = "credits"
    held: Amount = Field(description="set aside at submission")
    charged: Amount = Field(description="paid for the time it ran")
    released: Amount = Field(description="given back once it finished")
    billed_seconds: int
    settled: bool


class EarningsRow(BaseModel):
    provider_id: str
    month: date
    tasks: int
    gpu_hours: float
    gross: Amount = Field(description="what requesters paid")
    fees: Amount
    earned: Amount = Field(description="gross less the platform's fee")


class EarningsOut(BaseModel):
    currency: Literal["credits"] = "credits"
    earned: Amount = Field(description="all time, every machine")
    rows: list[EarningsRow] = Field(description="per machine and calendar month (UTC)")


class ModelTotals(BaseModel):
    gpu_model: str
    gpu_hours: float
    revenue: Amount
    fees: Amount


class TotalsOut(BaseModel):
    currency: Literal["credits"] = "credits"
    credits_issued: Amount
    requester_available: Amount
    requester_held: Amount
    provider_earnings: Amount
    platform_fees: Amount
    revenue: Amount = Field(description="all charges, fees included")
    gpu_hours_sold: float
    by_model: list[ModelTotals]
    ledger_balanced: bool = Field(description="every balance sums to zero, as it must")
