"""The job store: the only code that writes jobs. The gateway calls it in process.

Functions take the session; the caller owns the transaction.
"""

import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from functools import cache

from sqlalchemy import Update, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession

from billing import ledger, reports
from billing.holds import InsufficientFunds, admit_holds
from billing.settings import BillingSettings
from common.db import ArrayRows, update_rows
from common.errors import NotFound
from common.ids import is_uuid
from scheduler import settling, states
from scheduler.models import Job, JobOutput
from scheduler.schemas import JobCost, JobOut, JobSpec, QueueInfo, Resources


def output_key(job_id: str, attempt: int, path: str) -> str:
    return f"{job_id}/{attempt}/{path}"


def log_key(job_id: str, attempt: int) -> str:
    return f"{job_id}/{attempt}.log"


def new_job(
    owner_id: str,
    spec: JobSpec,
    array_id: str | None = None,
    array_index: int | None = None,
    billing: BillingSettings | None = None,
) -> Job:
    """A queued job. With `billing`, it gets a price ceiling (the platform's default if
    the spec has none) and the hold its worst case needs; without, it is never charged."""
    resources = spec.resources
    job = Job(
        id=str(uuid.uuid4()),
        owner_id=owner_id,
        status=states.QUEUED,
        image=spec.image,
        command=spec.command,
        env=spec.env,
        gpus=resources.gpus,
        gpu_models=resources.gpu_models,
        min_vram_gb=resources.min_vram_gb,
        min_compute_capability=resources.min_compute_capability,
        min_cuda_version=resources.min_cuda_version,
        region=resources.region,
        labels=resources.labels,
        cpus=resources.cpus,
        memory_gb=resources.memory_gb,
        egress=spec.egress,
        inputs=[i.model_dump() for i in spec.inputs],
        max_price_per_gpu_hour=spec.max_price_per_gpu_hour,
        max_duration_s=spec.max_duration_s,
        priority=spec.priority,
        retries=spec.retries,
        retry_on_exit_codes=spec.retry_on_exit_codes,
        array_id=array_id,
        array_index=array_index,
        attempt=0,
        gpu_uuids=[],
        avoid_providers=[],
    )
    if billing is not None:
        job.max_price_per_gpu_hour = settling.price_ceiling(spec.max_price_per_gpu_hour, billing)
        job.hold_amount = settling.hold_for(job).amount
    return job


@dataclass(frozen=True)
class Submission:
    """One request's jobs: a single job, or a job array (all or nothing, each job with
    the array's id and its index)."""

    owner_id: str
    specs: list[JobSpec]
    array: bool = False


async def create_job(
    session: AsyncSession, owner_id: str, spec: JobSpec, billing: BillingSettings | None = None
) -> Job:
    """Inserts the job and, with `billing`, holds its worst-case cost from the owner's
    credits (InsufficientFunds, a 402, when they don't cover it)."""
    [created] = await create_submissions(session, [Submission(owner_id, [spec])], billing)
    if isinstance(created, InsufficientFunds):
        raise created
    return created[0]


async def create_submissions(
    session: AsyncSession,
    submissions: list[Submission],
    billing: BillingSettings | None = None,
) -> list[list[Job] | InsufficientFunds]:
    """Inserts many submissions in one go, each job with its own hold, in their order:
    the gateway's group commit of concurrent requests. A submission its owner's credits
    don't cover gets InsufficientFunds and writes nothing, exactly as if the submissions
    had come one after the other; the others go in.

    created_at is the transaction's time plus the job's position in microseconds, so the
    queue's FIFO order within a priority is the order of arrival, and an array's jobs
    come up in index order.
    """
    start = await session.scalar(select(func.now()))
    made: list[list[Job]] = []
    position = 0
    for submission in submissions:
        array_id = str(uuid.uuid4()) if submission.array else None
        jobs = []
        for index, spec in enumerate(submission.specs):
            job = new_job(submission.owner_id, spec, array_id, index if array_id else None, billing)
            job.created_at = start + timedelta(microseconds=position)
            position += 1
            jobs.append(job)
        made.append(jobs)
    results: list[list[Job] | InsufficientFunds] = list(made)
    postings = []
    if billing is not None:
        # With billing, new_job gave every job its hold.
        admission = await admit_holds(
            session,
            [
                (s.owner_id, settling.holds_of(jobs))
                for s, jobs in zip(submissions, made, strict=True)
            ],
        )
        for i, refusal in enumerate(admission.refusals):
            if refusal is not None:
                results[i] = refusal
        postings = admission.postings
    session.add_all([job for r in results if isinstance(r, list) for job in r])
    await session.flush()
    await ledger.post(session, postings)
    return results


async def write_changed(
    session: AsyncSession, jobs: Iterable[Job], columns: Collection[str]
) -> None:
    """Writes the jobs changed in memory in one UPDATE, all of `columns` for each, and takes
    them out of the session (its flush would write them again, row by row).

    For the scheduler's batches: its changes are the same few columns for hundreds of
    jobs, where the ORM's flush costs ~60 us a job. Raises on a change to any other
    column, which would otherwise be lost."""
    changed = [job for job in jobs if inspect(job).modified]
    if not changed:
        return
    written = set(columns)
    for job in changed:
        if stray := inspect(job).committed_state.keys() - written:
            raise ValueError(f"job {job.id}: {sorted(stray)} changed but not written")
    rows, statement = _jobs_update(("id", *columns))
    with session.no_autoflush:  # not the ORM's writes of these same jobs first
        await session.execute(statement, rows.params_of(changed))
    for job in changed:
        session.expunge(job)


@cache
def _jobs_update(columns: tuple[str, ...]) -> tuple[ArrayRows, Update]:
    """The UPDATE of these columns (`id` first) for many jobs, built once per caller."""
    rows = ArrayRows.of(Job.__table__, columns)
    return rows, update_rows(Job.__table__, "id", rows)


async def get_job(session: AsyncSession, job_id: str, owner_id: str | None = None) -> Job:
    """The job; someone else's job is 'not found', so ids can't be probed."""
    job = await session.get(Job, job_id) if is_uuid(job_id) else None
    if job is None or (owner_id is not None and job.owner_id != owner_id):
        raise NotFound(f"job {job_id} not found")
    return job


async def get_task(session: AsyncSession, job_id: str, provider_id: str, attempt: int) -> Job:
    """The job, if this attempt was sent to this provider; anything else is 'not found'."""
    job = await session.get(Job, job_id) if is_uuid(job_id) else None
    if job is None or job.provider_id != provider_id or job.attempt != attempt:
        raise NotFound(f"no task {job_id} attempt {attempt} for this provider")
    return job


async def list_jobs(
    session: AsyncSession,
    owner_id: str | None,
    status: str | None = None,
    limit: int = 100,
    array_id: str | None = None,
) -> list[Job]:
    """The owner's jobs, newest first (everyone's for owner_id None); one array's jobs
    in index order."""
    query = select(Job)
    if owner_id is not None:
        query = query.where(Job.owner_id == owner_id)
    if status is not None:
        query = query.where(Job.status == status)
    if array_id is not None:
        query = query.where(Job.array_id == array_id).order_by(Job.array_index)
    else:
        query = query.order_by(Job.created_at.desc())
    query = query.limit(limit)
    return list((await session.scalars(query)).all())


async def request_cancel(
    session: AsyncSession, job_id: str, owner_id: str | None, billing: BillingSettings
) -> Job:
    """Cancels the job. A queued job ends at once and its hold comes back; a running one
    ends when its daemon confirms the container stopped, which is also when its GPUs are
    freed and its time is charged."""
    job = await get_job(session, job_id, owner_id)
    job = await session.get(Job, job.id, with_for_update=True, populate_existing=True)
    assert job is not None
    if job.status in states.TERMINAL:
        return job
    job.cancel_requested = True
    if job.status == states.QUEUED:
        job.status = states.CANCELLED
        job.waiting_reason = None
        job.finished_at = func.now()
        await settling.settle(session, billing, [job])
    else:
        # Ends when its daemon confirms the container stopped (lifecycle asks again
        # until it does); the GPUs are held until then.
        job.status = states.CANCELLED
        job.stop_requested_at = func.now()
    await session.flush()
    await session.refresh(job)
    return job


async def list_outputs(session: AsyncSession, job: Job) -> list[JobOutput]:
    query = (
        select(JobOutput)
        .where(JobOutput.job_id == job.id, JobOutput.attempt == job.attempt)
        .order_by(JobOutput.path)
    )
    return list((await session.scalars(query)).all())


def job_resources(job: Job) -> Resources:
    return Resources(
        gpus=job.gpus,
        gpu_models=job.gpu_models,
        min_vram_gb=job.min_vram_gb,
        min_compute_capability=job.min_compute_capability,
        min_cuda_version=job.min_cuda_version,
        region=job.region,
        labels=job.labels or {},
        cpus=job.cpus,
        memory_gb=job.memory_gb,
    )


def job_out(job: Job, queue: QueueInfo | None = None, cost: JobCost | None = None) -> JobOut:
    return JobOut(
        id=job.id,
        status=job.status,
        waiting_reason=job.waiting_reason,
        queue=queue,
        array_id=job.array_id,
        array_index=job.array_index,
        attempt=job.attempt,
        provider_id=job.provider_id,
        exit_code=job.exit_code,
        failure_reason=job.failure_reason,
        image=job.image,
        command=job.command,
        resources=job_resources(job),
        max_price_per_gpu_hour=job.max_price_per_gpu_hour,
        price_per_gpu_hour=job.price_per_gpu_hour,
        gpu_model=job.gpu_model,
        cost=cost,
        max_duration_s=job.max_duration_s,
        priority=job.priority,
        retries=job.retries,
        retry_on_exit_codes=job.retry_on_exit_codes or [],
        egress=job.egress,
        not_before=job.not_before,
        created_at=job.created_at,
        assigned_at=job.assigned_at,
        accepted_at=job.accepted_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def new_job_out(job: Job) -> JobOut:
    """A job just submitted: its cost is its hold, no query needed."""
    cost = None
    if job.hold_amount is not None:
        cost = JobCost(
            held=job.hold_amount,
            charged=Decimal(0),
            released=Decimal(0),
            billed_seconds=0,
            settled=False,
        )
    return job_out(job, cost=cost)


async def jobs_out(session: AsyncSession, jobs: list[Job]) -> list[JobOut]:
    """The jobs as the API shows them, with what each cost so far."""
    costs = await reports.job_costs(
        session,
        [reports.JobMoney(job.id, job.hold_amount, job.settled_at is not None) for job in jobs],
    )
    return [job_out(job, cost=costs.get(job.id)) for job in jobs]


@dataclass(frozen=True)
class ProviderWork:
    running: list[Job]
    tasks_ended: int


async def provider_work(session: AsyncSession, provider_id: str) -> ProviderWork:
    """What a provider runs now, and how many tasks it has ended."""
    running = (
        await session.scalars(
            select(Job)
            .where(Job.provider_id == provider_id, Job.status.in_(states.ACTIVE))
            .order_by(Job.assigned_at)
        )
    ).all()
    ended = await session.scalar(
        select(func.count()).where(Job.provider_id == provider_id, Job.finished_at.is_not(None))
    )
    return ProviderWork(running=list(running), tasks_ended=int(ended or 0))
