"""Placement: match a queued job to free GPUs and reserve them, atomically.

Shape of dstack's pipelines: lock the job row with SKIP LOCKED (another replica that
holds it is placing it), reserve GPUs through the registry's capacity module in the
same transaction, commit, then publish the task outside the transaction.
"""

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from common.messages import TaskAssignment, TaskInput
from provider_registry import capacity
from scheduler import states
from scheduler.models import Job

WAITING_FOR_CAPACITY = "waiting for free GPUs that match"


def gpu_request(job: Job, allow_simulated: bool) -> capacity.GpuRequest:
    return capacity.GpuRequest(
        count=job.gpus,
        models=job.gpu_models,
        min_vram_mb=int(job.min_vram_gb * 1024) if job.min_vram_gb else None,
        max_price_per_hour=Decimal(job.max_price_per_gpu_hour)
        if job.max_price_per_gpu_hour is not None
        else None,
        allow_simulated=allow_simulated,
    )


async def queued_job_ids(session: AsyncSession, limit: int) -> list[str]:
    query = (
        select(Job.id)
        .where(Job.status == states.QUEUED)
        .order_by(Job.priority.desc(), Job.created_at)
        .limit(limit)
    )
    return list((await session.scalars(query)).all())


@dataclass(frozen=True)
class Placement:
    provider_id: str
    task: TaskAssignment


# Why a request shape found no GPUs in this placement pass, by shape.
Misses = dict[tuple, str]


def _shape(request: capacity.GpuRequest, avoid: list[str]) -> tuple:
    return (
        request.count,
        tuple(request.models or ()),
        request.min_vram_mb,
        request.max_price_per_hour,
        request.allow_simulated,
        tuple(sorted(avoid)),
    )


async def place_job(
    session: AsyncSession, job_id: str, allow_simulated: bool, misses: Misses | None = None
) -> Placement | None:
    """Reserves GPUs for a queued job and marks it assigned; None if it must wait.

    `misses` carries what failed earlier in the same pass: capacity only shrinks during
    a pass, so a job shaped like one that found nothing waits without asking again.
    """
    job = await session.scalar(
        select(Job)
        .where(Job.id == job_id, Job.status == states.QUEUED)
        .with_for_update(skip_locked=True)
    )
    if job is None:
        return None  # placed, cancelled, or being placed by another replica
    request = gpu_request(job, allow_simulated)
    shape = _shape(request, job.avoid_providers)
    known_miss = misses.get(shape) if misses is not None else None
    reservation = None
    if known_miss is None:
        reservation = await capacity.reserve(session, job.id, request, avoid=job.avoid_providers)
    if reservation is None:
        reason = known_miss or (
            await capacity.why_unplaceable(session, request, job.avoid_providers)
            or WAITING_FOR_CAPACITY
        )
        if misses is not None:
            misses[shape] = reason
        if job.waiting_reason != reason:
            job.waiting_reason = reason
        return None
    job.status = states.ASSIGNED
    job.waiting_reason = None
    job.provider_id = reservation.provider_id
    job.gpu_uuids = reservation.gpu_uuids
    job.price_per_gpu_hour = reservation.price_per_gpu_hour
    job.assigned_at = func.now()
    await session.flush()
    task = TaskAssignment(
        job_id=job.id,
        attempt=job.attempt,
        image=job.image,
        command=job.command,
        env=job.env,
        gpu_uuids=reservation.gpu_uuids,
        inputs=[TaskInput(**i) for i in job.inputs],
        max_duration_s=job.max_duration_s,
    )
    return Placement(provider_id=reservation.provider_id, task=task)


async def unassign(session: AsyncSession, job_id: str, attempt: int, reason: str) -> None:
    """Puts an assigned job back in the queue when its task could not be sent."""
    job = await session.get(Job, job_id, with_for_update=True)
    if job is None or job.status != states.ASSIGNED or job.attempt != attempt:
        return
    await capacity.release(session, job.id)
    job.status = states.QUEUED
    job.provider_id = None
    job.gpu_uuids = []
    job.waiting_reason = reason
