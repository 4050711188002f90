"""The scheduler's side of billing: what a job holds at submission, which attempt ended
how, and settling finished jobs in the same transaction that ended them."""

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing import settlement
from billing.holds import Hold, hold_amount
from billing.settings import BillingSettings
from scheduler import states
from scheduler.models import Job


def price_ceiling(spec_max_price: Decimal | None, settings: BillingSettings) -> Decimal:
    """The job's own ceiling, or the platform's default: the hold needs one."""
    return spec_max_price if spec_max_price is not None else settings.default_max_price_per_gpu_hour


def hold_for(job: Job) -> Hold:
    """GPUs x price ceiling x time limit, once per attempt the requester can be charged
    for: one, or every retry too when exit codes are retried (a user's failure is paid)."""
    assert job.max_price_per_gpu_hour is not None
    attempts = 1 + job.retries if job.retry_on_exit_codes else 1
    return Hold(
        job.id, hold_amount(job.gpus, job.max_price_per_gpu_hour, job.max_duration_s, attempts)
    )


def holds_of(jobs: list[Job]) -> list[Hold]:
    """The holds new_job computed, to be placed once the jobs are inserted."""
    return [Hold(job.id, job.hold_amount) for job in jobs if job.hold_amount is not None]


def ended_attempt(
    job: Job,
    *,
    ended_seen_at: datetime | None,
    chargeable: bool,
    reason: str | None = None,
    started_at: datetime | None = None,
    ended_at: datetime | None = None,
) -> settlement.EndedAttempt | None:
    """The job's current attempt as it ends: call before the job is requeued. None for an
    attempt that never reached a provider or a job without a hold (never charged)."""
    if job.provider_id is None or job.hold_amount is None:
        return None
    return settlement.EndedAttempt(
        job_id=job.id,
        attempt=job.attempt,
        owner_id=job.owner_id,
        provider_id=job.provider_id,
        gpu_model=job.gpu_model,
        gpus=job.gpus,
        price_per_gpu_hour=job.price_per_gpu_hour or Decimal(0),
        max_duration_s=job.max_duration_s,
        started_at=started_at or job.started_at,
        ended_at=ended_at,
        started_seen_at=job.started_seen_at,
        ended_seen_at=ended_seen_at,
        chargeable=chargeable and (started_at or job.started_at) is not None,
        reason=reason,
    )


def mark_finished(jobs: Iterable[Job], now: datetime | None) -> list[settlement.FinishedJob]:
    """Jobs that ended for good and are not settled yet; marks them settled (the caller
    settles them in the same transaction). `now`: the transaction's time when the caller
    has read it; a value instead of the SQL function lets the ORM write many jobs in one
    UPDATE."""
    done = []
    for job in jobs:
        if (
            job.status in states.TERMINAL
            and job.finished_at is not None
            and job.settled_at is None
            and job.hold_amount is not None
        ):
            job.settled_at = func.now() if now is None else now
            done.append(settlement.FinishedJob(job_id=job.id, owner_id=job.owner_id))
    return done


async def settle(
    session: AsyncSession,
    settings: BillingSettings,
    jobs: list[Job],
    ended: Sequence[settlement.EndedAttempt | None] = (),
) -> list[settlement.Charged]:
    """Charges the ended attempts and settles whichever of `jobs` have finished."""
    return await settlement.settle(
        session, settings, [a for a in ended if a is not None], mark_finished(jobs, None)
    )


async def settle_stragglers(
    sessionmaker: async_sessionmaker, settings: BillingSettings, older_than: datetime
) -> int:
    """The backstop: finished jobs whose settlement no other path made (their unused hold
    goes back). One transaction per job, skipping jobs another replica holds."""
    async with sessionmaker() as session:
        ids = (
            await session.scalars(
                select(Job.id)
                .where(
                    Job.settled_at.is_(None),
                    Job.hold_amount.is_not(None),
                    Job.finished_at < older_than,
                )
                .limit(500)
            )
        ).all()
    settled = 0
    for job_id in ids:
        async with sessionmaker.begin() as session:
            job = await session.scalar(
                select(Job).where(Job.id == job_id).with_for_update(skip_locked=True)
            )
            if job is not None and job.settled_at is None:
                await settle(session, settings, [job])
                settled += 1
    return settled
