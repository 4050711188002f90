"""What the scheduler does when a provider or a task stops answering.

- A lost provider (provider.lost.<id>, from the registry's liveness sweep): its attempts
  go back to the queue (or fail with `provider_lost` once retries are spent).
- A task its daemon did not accept within the deadline: the same, as the machine's fault.
- A run past max_duration_s (the daemon enforces it; this is the backstop): timed_out,
  and the daemon is asked to stop the container. Its GPUs stay held until the daemon
  says the container stopped (or the provider is lost), never double-booked.
- A stop the daemon has not confirmed: asked again, since a cancel message may be lost
  with a NATS outage. The daemon answers a cancel for an attempt it never ran with a
  `finished` event, so GPUs held for a task that was never delivered come back too.

The caller sends a TaskCancel for every Stopped returned, after the commit. Sweeps run a
short transaction per job, so they never hold many jobs' locks at once.
"""

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from sqlalchemy import Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing.settings import BillingSettings
from common.messages import ProviderLost
from provider_registry import capacity
from scheduler import settling, states
from scheduler.models import Job
from scheduler.retries import PROVIDER_LOST, RetryPolicy, Stopped, requeue_or_fail

log = logging.getLogger(__name__)

TIMED_OUT_REASON = "max_duration_s exceeded"


def _stopped(job: Job, provider_id: str) -> Stopped:
    return Stopped(job_id=job.id, attempt=job.attempt, provider_id=provider_id)


async def take_back(
    session: AsyncSession, job: Job, reason: str, policy: RetryPolicy
) -> Stopped | None:
    """Takes the job's current attempt away from its provider as the machine's fault."""
    provider_id = job.provider_id
    if provider_id is None or job.finished_at is not None:
        return None
    # The machine's fault: recorded for the bill, charged nothing.
    ended = settling.ended_attempt(job, ended_seen_at=None, chargeable=False, reason=reason)
    attempt, requeued = job.attempt, False
    if job.status in states.ACTIVE:
        requeued = await requeue_or_fail(
            session,
            job,
            reason,
            policy,
            avoid_provider=True,
            failure_reason=f"{PROVIDER_LOST}: {reason}",
        )
    else:
        # Cancelled or timed out while its daemon was unreachable: the stop is final.
        await capacity.release(session, job.id)
        job.finished_at = func.now()
    stopped = Stopped(job.id, attempt, provider_id, ended, requeued)
    log.warning(
        "attempt taken back from its provider",
        extra={
            "job_id": job.id,
            "attempt": stopped.attempt,
            "provider_id": provider_id,
            "reason": reason,
            "status": job.status,
        },
    )
    return stopped


async def on_provider_lost(
    session: AsyncSession, lost: ProviderLost, policy: RetryPolicy, billing: BillingSettings
) -> list[Stopped]:
    """Every unfinished attempt the provider held when it was lost. Replays are no-ops:
    a job already taken back no longer names this provider."""
    held = select(Job.id).where(
        Job.provider_id == lost.provider_id,
        Job.finished_at.is_(None),
        Job.assigned_at <= lost.at,
    )
    ids = set((await session.scalars(held)).all()) | set(lost.job_ids)
    stopped, jobs = [], []
    for job_id in sorted(ids):  # one lock order for every writer of many jobs
        job = await session.get(Job, job_id, with_for_update=True)
        if job is None or job.provider_id != lost.provider_id:
            continue
        taken = await take_back(session, job, "the provider stopped sending heartbeats", policy)
        if taken is not None:
            stopped.append(taken)
            jobs.append(job)
    await settling.settle(session, billing, jobs, [s.ended for s in stopped])
    return stopped


async def _each_locked(
    sessionmaker: async_sessionmaker,
    query: Select,
    act: Callable[[AsyncSession, Job], Awaitable[Stopped | None]],
    billing: BillingSettings,
) -> list[Stopped]:
    """Runs `act` on each job the query finds, one short transaction per job: the job
    is locked again (SKIP LOCKED: another replica has it) and the query's conditions
    re-checked, so a job that moved on meanwhile is left alone. A job `act` ends is
    settled in the same transaction."""
    async with sessionmaker() as session:
        job_ids = list((await session.scalars(query.with_only_columns(Job.id))).all())
    stopped = []
    for job_id in job_ids:
        async with sessionmaker.begin() as session:
            job = await session.scalar(
                query.where(Job.id == job_id).with_for_update(skip_locked=True)
            )
            if job is not None and (taken := await act(session, job)) is not None:
                stopped.append(taken)
                await settling.settle(session, billing, [job], [taken.ended])
    return stopped


async def expire_unaccepted(
    sessionmaker: async_sessionmaker,
    now: datetime,
    accept_timeout_s: float,
    policy: RetryPolicy,
    billing: BillingSettings,
) -> list[Stopped]:
    """Tasks whose daemon did not say `accepted` within the deadline."""
    query = select(Job).where(
        Job.finished_at.is_(None),
        Job.provider_id.is_not(None),
        Job.status == states.ASSIGNED,
        Job.accepted_at.is_(None),
        Job.assigned_at < now - timedelta(seconds=accept_timeout_s),
    )
    reason = f"the provider did not accept the task within {accept_timeout_s:g} s"

    async def take(session: AsyncSession, job: Job) -> Stopped | None:
        return await take_back(session, job, reason, policy)

    return await _each_locked(sessionmaker, query, take, billing)


async def expire_overdue(
    sessionmaker: async_sessionmaker, now: datetime, grace_s: float, billing: BillingSettings
) -> list[Stopped]:
    """Attempts past max_duration_s (plus a grace for the daemon to report it itself)."""
    began = func.coalesce(Job.started_at, Job.accepted_at, Job.assigned_at)
    query = select(Job).where(
        Job.finished_at.is_(None),
        Job.provider_id.is_not(None),
        Job.status.in_(states.ACTIVE),
        began + func.make_interval(0, 0, 0, 0, 0, 0, Job.max_duration_s + grace_s) < now,
    )

    async def time_out(session: AsyncSession, job: Job) -> Stopped | None:
        assert job.provider_id is not None
        job.status = states.TIMED_OUT
        job.failure_reason = TIMED_OUT_REASON
        job.stop_requested_at = func.now()
        log.warning(
            "job timed out by the platform's clock",
            extra={"job_id": job.id, "attempt": job.attempt, "provider_id": job.provider_id},
        )
        return _stopped(job, job.provider_id)

    return await _each_locked(sessionmaker, query, time_out, billing)


async def unconfirmed_stops(
    session: AsyncSession, now: datetime, resend_after_s: float
) -> list[Stopped]:
    """Stops asked for a while ago that no daemon confirmed: to be asked again."""
    rows = await session.execute(
        select(Job.id, Job.attempt, Job.provider_id).where(
            Job.finished_at.is_(None),
            Job.provider_id.is_not(None),
            or_(Job.status == states.CANCELLED, Job.status == states.TIMED_OUT),
            Job.stop_requested_at < now - timedelta(seconds=resend_after_s),
        )
    )
    return [Stopped(job_id=r.id, attempt=r.attempt, provider_id=r.provider_id) for r in rows]
