"""Settlement: each ended attempt is metered and charged from its job's hold, the
provider owner is paid its price minus the platform's fee, and a finished job's unused
hold goes back to its owner. All in the caller's transaction, once per attempt and once
per job however often it is replayed."""

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import Integer, Select, String, func, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from billing import amounts, ledger
from billing.metering import meter
from billing.models import AVAILABLE, EARNINGS, FEES, HELD, PLATFORM, Entry, Transfer, Usage
from billing.settings import BillingSettings
from common.db import ArrayRows, insert_rows, one_of
from provider_registry.models import Provider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndedAttempt:
    """A job attempt whose container ended (or never started), as the scheduler saw it."""

    job_id: str
    attempt: int
    owner_id: str
    provider_id: str
    gpu_model: str | None
    gpus: int
    price_per_gpu_hour: Decimal
    max_duration_s: int
    # The daemon's times for the container, and when the platform received its events.
    started_at: datetime | None
    ended_at: datetime | None
    started_seen_at: datetime | None
    ended_seen_at: datetime | None
    # False for an infrastructure fault: the machine failed, the requester pays nothing.
    chargeable: bool
    reason: str | None = None


@dataclass(frozen=True)
class FinishedJob:
    job_id: str
    owner_id: str


@dataclass(frozen=True)
class Charged:
    """What one settled attempt sold, for the metrics (counted after the commit)."""

    gpu_model: str
    gpu_hours: float
    cost: Decimal
    fee: Decimal


async def settle(
    session: AsyncSession,
    settings: BillingSettings,
    ended: list[EndedAttempt] = (),  # type: ignore[assignment]
    finished: list[FinishedJob] = (),  # type: ignore[assignment]
) -> list[Charged]:
    """Charges the ended attempts, then releases what is left of the finished jobs' holds.
    The caller holds the jobs' row locks; the accounts are locked here, in id order, as
    late as can be: every submission and settlement of a requester goes through the same
    two account rows, and their lock is held until the commit."""
    ended = await _not_settled(session, ended)
    if not ended and not finished:
        return []
    owners = await _provider_owners(session, {a.provider_id for a in ended})
    jobs = {a.job_id: a.owner_id for a in ended} | {f.job_id: f.owner_id for f in finished}
    held = await ledger.account_ids(session, {(HELD, owner) for owner in jobs.values()})
    # A job with a hold has its owner's `held` account; .get covers a row gone missing.
    left = await _held_per_job(
        session, {job: held.get((HELD, owner)) for job, owner in jobs.items()}
    )
    # A provider row is never deleted; the fallback only keeps a bad row from blocking.
    usages = [_usage(a, owners.get(a.provider_id, a.provider_id), left, settings) for a in ended]
    new = await _record(session, usages)

    keys: set[ledger.AccountKey] = {(FEES, PLATFORM)} if ended else set()
    for a in ended:
        keys |= {(HELD, a.owner_id), (EARNINGS, owners.get(a.provider_id, a.provider_id))}
    for f in finished:
        keys |= {(HELD, f.owner_id), (AVAILABLE, f.owner_id)}
    ids = (await ledger.lock(session, keys)).ids
    charged = []
    postings = []
    for u in usages:
        job_id, attempt = u["job_id"], u["attempt"]
        if (job_id, attempt) not in new:
            continue
        left[job_id] -= u["cost"]
        held = ids[(HELD, u["owner_id"])]
        common = {
            "job_id": job_id,
            "attempt": attempt,
            "provider_id": u["provider_id"],
            "gpu_model": u["gpu_model"],
        }
        postings += [
            ledger.Posting(
                key=f"charge:{job_id}:{attempt}",
                kind="charge",
                source=held,
                target=ids[(EARNINGS, u["provider_owner_id"])],
                amount=u["cost"] - u["fee"],
                memo=f"{u['billed_seconds']} s x {u['gpus']} GPU x "
                f"{u['price_per_gpu_hour']}/GPU-hour",
                **common,
            ),
            ledger.Posting(
                key=f"fee:{job_id}:{attempt}",
                kind="fee",
                source=held,
                target=ids[(FEES, PLATFORM)],
                amount=u["fee"],
                **common,
            ),
        ]
        if u["cost"] > 0:
            charged.append(
                Charged(
                    gpu_model=u["gpu_model"] or "unknown",
                    gpu_hours=u["gpus"] * u["billed_seconds"] / 3600,
                    cost=u["cost"],
                    fee=u["fee"],
                )
            )
    for f in finished:
        if left.get(f.job_id, 0) > 0:
            postings.append(
                ledger.Posting(
                    key=f"release:{f.job_id}",
                    kind="release",
                    source=ids[(HELD, f.owner_id)],
                    target=ids[(AVAILABLE, f.owner_id)],
                    amount=left[f.job_id],
                    job_id=f.job_id,
                )
            )
            left[f.job_id] = Decimal(0)
    await ledger.post(session, postings)
    return charged


def _usage(
    a: EndedAttempt, provider_owner_id: str, left: dict[str, Decimal], settings: BillingSettings
) -> dict:
    metered = meter(
        started_at=a.started_at,
        ended_at=a.ended_at,
        started_seen_at=a.started_seen_at,
        ended_seen_at=a.ended_seen_at,
        max_duration_s=a.max_duration_s,
        tolerance_s=settings.metering_tolerance_s,
    )
    billed = metered.billed_seconds if a.chargeable else 0
    cost = amounts.credits(a.gpus * a.price_per_gpu_hour * billed / Decimal(3600))
    reason = a.reason
    if cost > left[a.job_id]:
        # Only a job without a hold (submitted before billing existed) gets here: the
        # hold covers every attempt that can be charged at the job's price ceiling.
        log.warning(
            "charge exceeds the job's hold; capped",
            extra={"job_id": a.job_id, "attempt": a.attempt, "cost": str(cost)},
        )
        cost = left[a.job_id]
        reason = f"{reason + '; ' if reason else ''}capped at the job's hold"
    fee = amounts.credits(cost * settings.platform_fee_rate)
    return {
        "job_id": a.job_id,
        "attempt": a.attempt,
        "owner_id": a.owner_id,
        "provider_id": a.provider_id,
        "provider_owner_id": provider_owner_id,
        "gpu_model": a.gpu_model,
        "gpus": a.gpus,
        "price_per_gpu_hour": a.price_per_gpu_hour,
        "started_at": a.started_at,
        "ended_at": a.ended_at,
        "provider_seconds": metered.provider_seconds,
        "platform_seconds": metered.platform_seconds,
        "clock": metered.clock if a.chargeable else "none",
        "billed_seconds": billed,
        "chargeable": a.chargeable,
        "cost": cost,
        "fee": fee,
        "reason": reason,
    }


# One probe of the unique (job_id, attempt) index per attempt, through a LATERAL
# subquery that Postgres cannot flatten into a join (its LIMIT). As a plain
# `job_id = ANY(:ids)` filter, a generic plan (blind to the array's length) scanned the
# young table against the whole array: up to 73 ms a batch in the scheduling bench.
_ATTEMPTS = ArrayRows("ended", job_id=String, attempt=Integer)


def _settled() -> Select:
    ended = _ATTEMPTS.table
    usage = (
        select(Usage.id)
        .where(Usage.job_id == ended.c.job_id, Usage.attempt == ended.c.attempt)
        .limit(1)
        .lateral("usage")
    )
    return select(ended.c.job_id, ended.c.attempt).select_from(ended.join(usage, true()))


_SETTLED = _settled()


async def _not_settled(session: AsyncSession, ended: list[EndedAttempt]) -> list[EndedAttempt]:
    """Drops attempts settled before (a replay); the caller's job locks keep it so."""
    if not ended:
        return []
    done = set(await session.execute(_SETTLED, _ATTEMPTS.params_of(ended)))
    return [a for a in ended if (a.job_id, a.attempt) not in done]


_USAGES = ArrayRows.of(
    Usage.__table__,
    (
        "job_id",
        "attempt",
        "owner_id",
        "provider_id",
        "provider_owner_id",
        "gpu_model",
        "gpus",
        "price_per_gpu_hour",
        "started_at",
        "ended_at",
        "provider_seconds",
        "platform_seconds",
        "clock",
        "billed_seconds",
        "chargeable",
        "cost",
        "fee",
        "reason",
    ),
)
_RECORD = (
    insert_rows(Usage.__table__, _USAGES)
    .on_conflict_do_nothing(index_elements=["job_id", "attempt"])
    .returning(Usage.job_id, Usage.attempt)
)


async def _record(session: AsyncSession, usages: list[dict]) -> set[tuple[str, int]]:
    """Inserts the usage rows; returns the attempts that were not settled before."""
    if not usages:
        return set()
    rows = await session.execute(_RECORD, _USAGES.params(usages))
    return set(rows)


_OWNERS = select(Provider.id, Provider.owner_id).where(one_of(Provider.id, "provider_ids"))


async def _provider_owners(session: AsyncSession, provider_ids: set[str]) -> dict[str, str]:
    if not provider_ids:
        return {}
    rows = await session.execute(_OWNERS, {"provider_ids": list(provider_ids)})
    return {r.id: r.owner_id for r in rows}


_HELD = (
    select(Transfer.job_id, Entry.account_id, func.sum(Entry.amount))
    .join(Entry, Entry.transfer_id == Transfer.id)
    .where(one_of(Transfer.job_id, "job_ids"))
    .group_by(Transfer.job_id, Entry.account_id)
)


async def _held_per_job(
    session: AsyncSession, held_account: dict[str, int | None]
) -> dict[str, Decimal]:
    """What each job still has on hold: its hold, less what was charged or released. The
    caller locks the jobs, so no other transaction moves this money meanwhile."""
    left = {job: Decimal(0) for job in held_account}
    if not held_account:
        return left
    rows = await session.execute(_HELD, {"job_ids": list(held_account)})
    for job_id, account_id, amount in rows:
        if held_account[job_id] == account_id:
            left[job_id] = amount
    return left
