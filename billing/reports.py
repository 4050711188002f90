"""Read-only questions about money: balances, statements, job costs, earnings, totals."""

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession

from billing.models import (
    AVAILABLE,
    EARNINGS,
    FEES,
    FUNDING,
    HELD,
    Account,
    Entry,
    Transfer,
    Usage,
)
from billing.schemas import (
    BalanceOut,
    EarningsOut,
    EarningsRow,
    JobCost,
    LedgerEntryOut,
    LedgerPage,
    ModelTotals,
    TotalsOut,
)

ZERO = Decimal(0)
USER_ACCOUNTS = (AVAILABLE, HELD, EARNINGS)


async def balance(session: AsyncSession, owner_id: str) -> BalanceOut:
    rows = await session.execute(
        select(Account.kind, Account.balance).where(
            Account.owner_id == owner_id, Account.kind.in_(USER_ACCOUNTS)
        )
    )
    found = {r.kind: r.balance for r in rows}
    return BalanceOut(
        available=found.get(AVAILABLE, ZERO),
        held=found.get(HELD, ZERO),
        earnings=found.get(EARNINGS, ZERO),
    )


async def ledger_page(
    session: AsyncSession,
    owner_id: str,
    account: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> LedgerPage:
    """The owner's entries, newest first; `before` (an entry id) pages back in time."""
    query = (
        select(Entry, Account.kind, Transfer)
        .join(Account, Account.id == Entry.account_id)
        .join(Transfer, Transfer.id == Entry.transfer_id)
        .where(
            Account.owner_id == owner_id, Account.kind.in_([account] if account else USER_ACCOUNTS)
        )
        .order_by(Entry.id.desc())
        .limit(limit + 1)
    )
    if before is not None:
        query = query.where(Entry.id < before)
    rows = (await session.execute(query)).all()
    entries = [
        LedgerEntryOut(
            id=entry.id,
            at=entry.created_at,
            account=kind,
            kind=transfer.kind,
            amount=entry.amount,
            job_id=transfer.job_id,
            attempt=transfer.attempt,
            provider_id=transfer.provider_id,
            gpu_model=transfer.gpu_model,
            memo=transfer.memo,
        )
        for entry, kind, transfer in rows[:limit]
    ]
    more = len(rows) > limit
    return LedgerPage(entries=entries, next_before=entries[-1].id if more else None)


@dataclass(frozen=True)
class JobMoney:
    """What billing needs to know of a job to say what it cost."""

    job_id: str
    hold_amount: Decimal | None
    settled: bool


async def job_costs(session: AsyncSession, jobs: list[JobMoney]) -> dict[str, JobCost]:
    """Each billed job's cost so far, in two queries for any number of jobs."""
    billed = {j.job_id: j for j in jobs if j.hold_amount is not None}
    if not billed:
        return {}
    sums: dict[tuple[str, str], Decimal] = {}
    for job_id, kind, amount in await session.execute(
        select(Transfer.job_id, Transfer.kind, func.sum(Transfer.amount))
        .where(Transfer.job_id.in_(billed))
        .group_by(Transfer.job_id, Transfer.kind)
    ):
        sums[(job_id, kind)] = amount
    seconds = dict(
        (
            await session.execute(
                select(Usage.job_id, func.sum(Usage.billed_seconds))
                .where(Usage.job_id.in_(billed), Usage.chargeable)
                .group_by(Usage.job_id)
            )
        ).all()
    )
    return {
        job_id: JobCost(
            held=sums.get((job_id, "hold"), ZERO),
            charged=sums.get((job_id, "charge"), ZERO) + sums.get((job_id, "fee"), ZERO),
            released=sums.get((job_id, "release"), ZERO),
            billed_seconds=int(seconds.get(job_id) or 0),
            settled=job.settled,
        )
        for job_id, job in billed.items()
    }


async def earnings(session: AsyncSession, owner_id: str) -> EarningsOut:
    """The owner's machines' earnings per machine and month: money from the ledger,
    GPU-hours and gross from the metered usage recorded with it."""
    month_t = func.date_trunc("month", Transfer.created_at)
    earned = {
        (r.provider_id, r.month.date()): r.earned
        for r in await session.execute(
            select(
                Transfer.provider_id, month_t.label("month"), func.sum(Entry.amount).label("earned")
            )
            .join(Entry, Entry.transfer_id == Transfer.id)
            .join(Account, Account.id == Entry.account_id)
            .where(Account.owner_id == owner_id, Account.kind == EARNINGS)
            .group_by(Transfer.provider_id, month_t)
        )
    }
    month_u = func.date_trunc("month", Usage.created_at)
    used = {
        (r.provider_id, r.month.date()): r
        for r in await session.execute(
            select(
                Usage.provider_id,
                month_u.label("month"),
                func.count().label("tasks"),
                func.sum(Usage.gpus * Usage.billed_seconds).label("gpu_seconds"),
                func.sum(Usage.cost).label("gross"),
                func.sum(Usage.fee).label("fees"),
            )
            .where(Usage.provider_owner_id == owner_id, Usage.chargeable)
            .group_by(Usage.provider_id, month_u)
        )
    }
    rows = []
    for key in sorted(set(earned) | set(used), key=lambda k: (k[1], k[0] or ""), reverse=True):
        u = used.get(key)
        rows.append(
            EarningsRow(
                provider_id=key[0] or "",
                month=key[1],
                tasks=u.tasks if u else 0,
                gpu_hours=round(float(u.gpu_seconds or 0) / 3600, 6) if u else 0.0,
                gross=u.gross if u else ZERO,
                fees=u.fees if u else ZERO,
                earned=earned.get(key, ZERO),
            )
        )
    total = sum((r.earned for r in rows), ZERO)
    return EarningsOut(earned=total, rows=rows)


async def machine_earnings(session: AsyncSession, provider_id: str) -> Decimal:
    """What one machine earned its owner, after fees, from the ledger."""
    earned = await session.scalar(
        select(func.sum(Entry.amount))
        .join(Transfer, Transfer.id == Entry.transfer_id)
        .join(Account, Account.id == Entry.account_id)
        .where(Transfer.provider_id == provider_id, Account.kind == EARNINGS)
    )
    return earned or ZERO


async def totals(session: AsyncSession) -> TotalsOut:
    by_kind = dict(
        (
            await session.execute(
                select(Account.kind, func.sum(Account.balance)).group_by(Account.kind)
            )
        ).all()
    )
    model = func.coalesce(Usage.gpu_model, literal_column("'unknown'"))
    model_rows = (
        await session.execute(
            select(
                model,
                func.sum(Usage.gpus * Usage.billed_seconds),
                func.sum(Usage.cost),
                func.sum(Usage.fee),
            )
            .where(Usage.chargeable)
            .group_by(model)
            .order_by(model)
        )
    ).all()
    by_model = [
        ModelTotals(
            gpu_model=model,
            gpu_hours=round(float(gpu_seconds or 0) / 3600, 6),
            revenue=revenue or ZERO,
            fees=fees or ZERO,
        )
        for model, gpu_seconds, revenue, fees in model_rows
    ]
    entries_sum = await session.scalar(select(func.coalesce(func.sum(Entry.amount), 0)))
    balances_sum = sum(by_kind.values(), ZERO)
    return TotalsOut(
        credits_issued=-by_kind.get(FUNDING, ZERO),
        requester_available=by_kind.get(AVAILABLE, ZERO),
        requester_held=by_kind.get(HELD, ZERO),
        provider_earnings=by_kind.get(EARNINGS, ZERO),
        platform_fees=by_kind.get(FEES, ZERO),
        revenue=sum((m.revenue for m in by_model), ZERO),
        gpu_hours_sold=round(sum(m.gpu_hours for m in by_model), 6),
        by_model=by_model,
        ledger_balanced=entries_sum == 0 and balances_sum == 0,
    )
