"""Sending an attempt back to the queue, or ending the job when its retries are spent.

Every path that takes a job away from its provider comes through here: the daemon's
infrastructure fault or refusal, a lost provider, a task nobody accepted in time, an
exit code the job asked to retry on. One place decides the backoff, what the next
attempt avoids, and how the job ends when no retry is left.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession

from billing.settlement import EndedAttempt
from provider_registry import capacity
from scheduler import states
from scheduler.models import Job

PROVIDER_LOST = "provider_lost"


@dataclass(frozen=True)
class RetryPolicy:
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0

    def delay_s(self, attempt: int) -> float:
        """Before attempt `attempt` (1 for the first retry): 2 s, 4 s, 8 s ... capped."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** max(0, attempt - 1))


@dataclass(frozen=True)
class Stopped:
    """An attempt that the platform took back from a provider: its daemon must stop it."""

    job_id: str
    attempt: int
    provider_id: str
    # The attempt for settlement, when it ended here (not billed: not the user's fault).
    ended: EndedAttempt | None = field(default=None, compare=False)
    # Whether the job went back to the queue for another attempt (not ended).
    requeued: bool = field(default=False, compare=False)


def unplace(job: Job) -> None:
    """Back to queued, with no trace of where it was placed (its GPUs are released by
    the caller): machine, GPUs, price, and the times of the attempt."""
    job.status = states.QUEUED
    job.provider_id = None
    job.gpu_uuids = []
    job.price_per_gpu_hour = None
    job.gpu_model = None
    job.assigned_at = None
    job.accepted_at = None
    job.started_at = None
    job.started_seen_at = None
    job.stop_requested_at = None
    job.exit_code = None


async def requeue_or_fail(
    session: AsyncSession,
    job: Job,
    reason: str,
    policy: RetryPolicy,
    *,
    avoid_provider: bool,
    failure_reason: str,
    release_gpus: bool = True,
) -> bool:
    """Frees the attempt's GPUs and queues the next attempt after its backoff, or, with no
    retry left, ends the job as failed with `failure_reason`. True when requeued.

    `avoid_provider`: the fault was the machine's, so the next attempt goes elsewhere.
    `release_gpus`: False when the caller frees them itself in the same transaction (the
    events batch frees all its jobs' GPUs in one statement).
    """
    if release_gpus:
        await capacity.release(session, job.id)
    if job.attempt >= job.retries:
        job.status = states.FAILED
        job.failure_reason = failure_reason
        job.waiting_reason = None
        job.finished_at = func.now()
        return False
    provider_id = job.provider_id
    if avoid_provider and provider_id and provider_id not in job.avoid_providers:
        job.avoid_providers = [*job.avoid_providers, provider_id]
    job.attempt += 1
    unplace(job)
    delay = policy.delay_s(job.attempt)
    job.not_before = datetime.now(UTC) + timedelta(seconds=delay)
    job.waiting_reason = f"retrying in {delay:g} s (attempt {job.attempt + 1}): {reason}"
    return True
