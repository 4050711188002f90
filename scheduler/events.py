"""Applies the daemons' job events to the job state machine, idempotently.

An event counts only for the job's current attempt on the provider it was sent to; a
redelivered or stale event changes nothing. Whatever the job's state, an exited or
finished event frees the attempt's GPUs: a job the platform asked to stop (cancelled, or past its
time limit) keeps them until its daemon says the container stopped, and no late event
brings such a job back.

A batch costs the same few statements however many events it holds: its jobs are locked
in one query, in id order (the lock order of every writer of many jobs, so replicas never
deadlock); its events are applied to those rows in memory, each job's in their order;
then each kind of write goes in one statement: the jobs, the freed GPUs, the outputs, the
reliability counts, and the settlement's few (billing/settlement.py).
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import defer

from billing import settlement
from billing.settings import BillingSettings
from billing.settlement import Charged, EndedAttempt, FinishedJob
from common.db import one_of
from common.messages import JobEvent
from provider_registry import capacity, reliability
from scheduler import job_store, settling, states
from scheduler.models import Job, JobOutput
from scheduler.retries import RetryPolicy, requeue_or_fail

log = logging.getLogger(__name__)


@dataclass
class Effect:
    """What the worker must do after the transaction commits."""

    gpus_freed: bool = False
    requeued: bool = False
    # For the metrics: why the attempt was sent back, how long the job waited to run
    # and how long it ran (with the state it ended in).
    retry_reason: str | None = None
    waited_s: float | None = None
    ran: tuple[str, float] | None = None
    new_status: str | None = None
    # For settlement, in the same transaction: the job the event was for, and its
    # attempt when the event ended it.
    job: Job | None = None
    ended: EndedAttempt | None = None


def _outcome_status(event: JobEvent) -> str:
    if event.outcome == "timed_out":
        return states.TIMED_OUT
    if event.outcome == "cancelled":
        return states.CANCELLED
    if event.outcome == "exited" and event.exit_code == 0:
        return states.SUCCEEDED
    return states.FAILED


async def apply_events(
    session: AsyncSession,
    events: list[tuple[JobEvent, datetime | None]],
    policy: RetryPolicy,
    billing: BillingSettings,
) -> tuple[list[Effect], list[Charged]]:
    """Applies (event, seen_at) pairs in order, then settles in the same transaction
    what they ended: the money moves with the state, never apart from it."""
    effects, finished = await _apply(session, events, policy, settle=True)
    charged = await settlement.settle(
        session, billing, [e.ended for e in effects if e.ended is not None], finished
    )
    return effects, charged


async def apply_event(
    session: AsyncSession,
    event: JobEvent,
    policy: RetryPolicy = RetryPolicy(),
    seen_at: datetime | None = None,
) -> Effect:
    """One event, as a batch of its own, without settlement. `seen_at`: when the platform
    received the event (JetStream's clock); metering checks the daemon's times against it."""
    [effect], _ = await _apply(session, [(event, seen_at)], policy, settle=False)
    return effect


def _infrastructure(event: JobEvent) -> bool:
    return event.type == "rejected" or event.outcome == "infrastructure"


@dataclass
class _Writes:
    """What a batch's events write besides the jobs' own columns, gathered so that each
    kind goes to the database in one statement."""

    # The transaction's time (Postgres now()); None only when no job of the batch exists.
    now: datetime | None
    # Event index -> the job whose GPUs the event frees.
    releases: dict[int, str] = field(default_factory=dict)
    outputs: list[dict] = field(default_factory=list)
    # (provider_id, infrastructure) per attempt that ended.
    outcomes: list[tuple[str, bool]] = field(default_factory=list)


async def _apply(
    session: AsyncSession,
    events: list[tuple[JobEvent, datetime | None]],
    policy: RetryPolicy,
    settle: bool,
) -> tuple[list[Effect], list[FinishedJob]]:
    """Applies the events; with `settle`, also marks the jobs they ended for good as
    settled (in the same UPDATE) and returns them for the caller to settle."""
    jobs, now = await _lock_jobs(session, {event.job_id for event, _ in events})
    writes = _Writes(now)
    effects = [
        await _apply_one(session, writes, index, jobs.get(event.job_id), event, seen_at, policy)
        for index, (event, seen_at) in enumerate(events)
    ]
    finished = (
        settling.mark_finished([e.job for e in effects if e.job is not None], now) if settle else []
    )
    await job_store.write_changed(session, jobs.values(), _EVENT_COLUMNS)
    freed = await capacity.release_many(session, set(writes.releases.values()))
    for index, job_id in writes.releases.items():
        # No GPU can be reserved for a job while its row is locked: the first event of
        # the batch to free a job's GPUs frees them all, the later ones free nothing.
        effects[index].gpus_freed = freed.pop(job_id, 0) > 0
    if writes.outputs:
        await session.execute(insert(JobOutput.__table__).on_conflict_do_nothing(), writes.outputs)
    await reliability.record_task_outcomes(session, writes.outcomes)
    return effects, finished


# Columns events never read: they stay in the database (and out of the JSON decoder).
_PLACEMENT_ONLY = (Job.image, Job.command, Job.env, Job.inputs, Job.gpu_models, Job.labels)


# The jobs, locked, and the transaction's time. Byte order, like Python's sorted(), which
# lifecycle's writers lock in.
_LOCK_JOBS = (
    select(Job, func.now())
    .where(one_of(Job.id, "job_ids"))
    .order_by(Job.id.collate("C"))
    .with_for_update()
    # Touching one of those raises instead of loading it quietly.
    .options(*(defer(column, raiseload=True) for column in _PLACEMENT_ONLY))
    .execution_options(populate_existing=True)
)


async def _lock_jobs(
    session: AsyncSession, job_ids: set[str]
) -> tuple[dict[str, Job], datetime | None]:
    """The jobs, locked in one query, and the transaction's time."""
    if not job_ids:
        return {}, None
    rows = (await session.execute(_LOCK_JOBS, {"job_ids": list(job_ids)})).all()
    return {job.id: job for job, _ in rows}, rows[0][1] if rows else None


async def _apply_one(
    session: AsyncSession,
    writes: _Writes,
    index: int,
    job: Job | None,
    event: JobEvent,
    seen_at: datetime | None,
    policy: RetryPolicy,
) -> Effect:
    effect = Effect()
    if job is None or job.attempt != event.attempt or job.provider_id != event.provider_id:
        log.info("stale event ignored", extra={"job_id": event.job_id, "type": event.type})
        return effect

    effect.job = job
    if event.type == "accepted" and job.accepted_at is None:
        job.accepted_at = event.at
    elif event.type == "started" and job.status == states.ASSIGNED:
        job.status = states.RUNNING
        job.accepted_at = job.accepted_at or event.at
        job.started_at = event.at
        job.started_seen_at = seen_at
        effect.new_status = job.status
        effect.waited_s = max(0.0, ((seen_at or event.at) - job.created_at).total_seconds())
    elif event.type == "exited":
        # The container is gone: its GPUs may take the next job while the daemon uploads
        # the results; the job ends with `finished`.
        writes.releases[index] = job.id
    elif event.type in ("finished", "rejected"):
        writes.releases[index] = job.id
        if job.finished_at is None or job.status in states.ACTIVE:
            # Before _finish: a requeue forgets the attempt's provider and times.
            effect.ended = settling.ended_attempt(
                job,
                ended_seen_at=seen_at,
                chargeable=not _infrastructure(event),
                reason=event.reason,
                started_at=event.started_at,
                ended_at=event.ended_at,
            )
            await _finish(session, writes, job, event, effect, policy)
    return effect


async def _finish(
    session: AsyncSession,
    writes: _Writes,
    job: Job,
    event: JobEvent,
    effect: Effect,
    policy: RetryPolicy,
) -> None:
    job.exit_code = event.exit_code
    job.log_tail = event.log_tail
    writes.outputs += [
        {
            "job_id": job.id,
            "attempt": job.attempt,
            "path": o.path,
            "size": o.size,
            "sha256": o.sha256,
        }
        for o in event.outputs
    ]
    if job.status not in states.ACTIVE:
        # The platform already ended it (cancel, time limit): the container has stopped.
        job.finished_at = event.at
        effect.ran = _run_time(job.status, job.started_at, event)
        return
    infrastructure = _infrastructure(event)
    # Once per attempt: a replayed event is stale by now (attempt moved on or job ended).
    writes.outcomes.append((event.provider_id, infrastructure))
    retry_reason = None
    if infrastructure:
        retry_reason = f"infrastructure fault: {event.reason}"
        effect.retry_reason = "infrastructure"
    elif event.outcome == "exited" and event.exit_code in (job.retry_on_exit_codes or []):
        retry_reason = f"exit code {event.exit_code} is in retry_on_exit_codes"
        effect.retry_reason = "exit_code"
    if retry_reason is not None and job.attempt < job.retries:
        # Not the user's fault (or the user asked): run it again, elsewhere if the
        # machine was at fault. The batch frees the GPUs this event asked to free.
        effect.requeued = await requeue_or_fail(
            session,
            job,
            retry_reason,
            policy,
            avoid_provider=infrastructure,
            failure_reason=retry_reason,
            release_gpus=False,
        )
        job.log_tail = None
    else:
        job.status = _outcome_status(event)
        job.finished_at = event.at if job.started_at else writes.now
        job.failure_reason = _failure_reason(event, job.status)
        effect.ran = _run_time(job.status, job.started_at, event)
    effect.new_status = job.status


# Every column an event (or the requeue it causes) may write: each changed job writes
# them all, in one UPDATE for the batch (job_store.write_changed refuses a change to
# any other).
_EVENT_COLUMNS = (
    "status",
    "attempt",
    "provider_id",
    "gpu_uuids",
    "price_per_gpu_hour",
    "gpu_model",
    "avoid_providers",
    "exit_code",
    "failure_reason",
    "log_tail",
    "waiting_reason",
    "not_before",
    "assigned_at",
    "accepted_at",
    "started_at",
    "started_seen_at",
    "stop_requested_at",
    "finished_at",
    "settled_at",
)


def _run_time(
    status: str, started_at: datetime | None, event: JobEvent
) -> tuple[str, float] | None:
    if started_at is None:
        return None
    ended_at = event.ended_at or event.at
    return status, max(0.0, (ended_at - started_at).total_seconds())


def _failure_reason(event: JobEvent, status: str) -> str | None:
    if status == states.SUCCEEDED:
        return None
    if status == states.TIMED_OUT:
        return "max_duration_s exceeded"
    if event.outcome == "infrastructure" or event.type == "rejected":
        return f"infrastructure: {event.reason}"
    return event.reason or f"command exited with code {event.exit_code}"
