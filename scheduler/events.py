"""Applies the daemons' job events to the job state machine, idempotently.

An event counts only for the job's current attempt on the provider it was sent to; a
redelivered or stale event changes nothing. Whatever the job's state, an exited or
finished event frees the attempt's GPUs: a job the platform asked to stop (cancelled, or past its
time limit) keeps them until its daemon says the container stopped, and no late event
brings such a job back.
"""

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from billing.settings import BillingSettings
from billing.settlement import Charged, EndedAttempt
from common.messages import JobEvent
from provider_registry import capacity, reliability
from scheduler import settling, states
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
    effects = [await apply_event(session, event, policy, seen_at) for event, seen_at in events]
    charged = await settling.settle(
        session,
        billing,
        [effect.job for effect in effects if effect.job is not None],
        [effect.ended for effect in effects],
    )
    return effects, charged


def _infrastructure(event: JobEvent) -> bool:
    return event.type == "rejected" or event.outcome == "infrastructure"


async def apply_event(
    session: AsyncSession,
    event: JobEvent,
    policy: RetryPolicy = RetryPolicy(),
    seen_at: datetime | None = None,
) -> Effect:
    """`seen_at`: when the platform received the event (JetStream's clock); metering
    checks the daemon's times against it."""
    effect = Effect()
    job = await session.get(Job, event.job_id, with_for_update=True)
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
        effect.gpus_freed = await capacity.release(session, job.id) > 0
    elif event.type in ("finished", "rejected"):
        effect.gpus_freed = await capacity.release(session, job.id) > 0
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
            await _finish(session, job, event, effect, policy)
    return effect


async def _finish(
    session: AsyncSession, job: Job, event: JobEvent, effect: Effect, policy: RetryPolicy
) -> None:
    job.exit_code = event.exit_code
    job.log_tail = event.log_tail
    if event.outputs:
        await session.execute(
            insert(JobOutput)
            .values(
                [
                    {
                        "job_id": job.id,
                        "attempt": job.attempt,
                        "path": o.path,
                        "size": o.size,
                        "sha256": o.sha256,
                    }
                    for o in event.outputs
                ]
            )
            .on_conflict_do_nothing()
        )
    if job.status not in states.ACTIVE:
        # The platform already ended it (cancel, time limit): the container has stopped.
        job.finished_at = event.at
        effect.ran = _run_time(job.status, job.started_at, event)
        return
    infrastructure = _infrastructure(event)
    # Once per attempt: a replayed event is stale by now (attempt moved on or job ended).
    await reliability.record_task_outcome(session, event.provider_id, infrastructure)
    retry_reason = None
    if infrastructure:
        retry_reason = f"infrastructure fault: {event.reason}"
        effect.retry_reason = "infrastructure"
    elif event.outcome == "exited" and event.exit_code in (job.retry_on_exit_codes or []):
        retry_reason = f"exit code {event.exit_code} is in retry_on_exit_codes"
        effect.retry_reason = "exit_code"
    if retry_reason is not None and job.attempt < job.retries:
        # Not the user's fault (or the user asked): run it again, elsewhere if the
        # machine was at fault.
        effect.requeued = await requeue_or_fail(
            session,
            job,
            retry_reason,
            policy,
            avoid_provider=infrastructure,
            failure_reason=retry_reason,
        )
        job.log_tail = None
    else:
        job.status = _outcome_status(event)
        job.finished_at = event.at if job.started_at else func.now()
        job.failure_reason = _failure_reason(event, job.status)
        effect.ran = _run_time(job.status, job.started_at, event)
    effect.new_status = job.status


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
