"""Placement: match queued jobs to free GPUs and reserve them, atomically.

Optimistic, as Nomad's schedulers do it: each pass decides against an in-memory view of
the fleet (fleet_index, refreshed from the rows changed since the last pass), naming
each job's GPUs, then commits the pass's decisions in Postgres in one statement, where
the GPU rows are locked with SKIP LOCKED and re-checked. Postgres is the referee: a
replica whose view was stale loses the race for those GPUs, reloads that machine and
decides again; no GPU is ever reserved twice.

Jobs are taken in fair-share order (queue_order) and locked with SKIP LOCKED, so several
replicas split the queue between them instead of waiting on each other. The tasks are
published after the commit; a task that could not be published goes back to the queue,
and one lost after publishing is caught by the accept deadline (lifecycle).
"""

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.gpu_models import canonical_model
from common.messages import TaskAssignment, TaskInput
from common.types import EGRESS_LABEL, version_number
from provider_registry import capacity
from scheduler import queue_order, retries, states
from scheduler.fleet_index import Demand, FleetIndex
from scheduler.fleet_sync import FleetSync
from scheduler.models import Job

log = logging.getLogger(__name__)

WAITING_FOR_CAPACITY = "waiting for free GPUs that match"
# A decision that lost its race is retried on a fresh view of that machine this often.
RACE_RETRIES = 3


def demand_of(job: Job | Row, allow_simulated: bool) -> Demand:
    return Demand(
        count=job.gpus,
        models=tuple(canonical_model(m) for m in job.gpu_models or ()),
        min_vram_mb=int(job.min_vram_gb * 1024) if job.min_vram_gb else None,
        min_compute_capability=version_number(job.min_compute_capability),
        min_cuda_version=version_number(job.min_cuda_version),
        max_price_per_hour=float(job.max_price_per_gpu_hour)
        if job.max_price_per_gpu_hour is not None
        else None,
        region=job.region,
        labels=_required_labels(job),
        cpus=job.cpus,
        memory_mb=int(job.memory_gb * 1024) if job.memory_gb else None,
        allow_simulated=allow_simulated,
        avoid=frozenset(job.avoid_providers or ()),
    )


def _required_labels(job: Job | Row) -> tuple[tuple[str, str], ...]:
    labels = dict(job.labels or {})
    if job.egress:
        labels[EGRESS_LABEL[0]] = EGRESS_LABEL[1]
    return tuple(sorted(labels.items()))


@dataclass(frozen=True)
class Placement:
    provider_id: str
    task: TaskAssignment


@dataclass
class PassResult:
    placements: list[Placement]
    # Ready jobs looked at that found no GPUs (their waiting_reason says why).
    waiting: int = 0
    # Decisions that lost the race for their GPUs to another replica.
    races_lost: int = 0


def task_for(job: Job, reservation: capacity.Reservation) -> TaskAssignment:
    env = dict(job.env)
    if job.array_id is not None:
        # Like Slurm's SLURM_ARRAY_TASK_ID: each job of an array knows its place in it.
        env["GPUMARKET_ARRAY_ID"] = job.array_id
        env["GPUMARKET_ARRAY_INDEX"] = str(job.array_index)
    return TaskAssignment(
        job_id=job.id,
        attempt=job.attempt,
        image=job.image,
        command=job.command,
        env=env,
        gpu_uuids=reservation.gpu_uuids,
        inputs=[TaskInput(**i) for i in job.inputs],
        max_duration_s=job.max_duration_s,
        egress=job.egress,
    )


class Placer:
    def __init__(
        self,
        sessionmaker: async_sessionmaker,
        index: FleetIndex,
        *,
        allow_simulated: bool,
        batch: int,
        scan: int,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.index = index
        self.sync = FleetSync(index)
        self.allow_simulated = allow_simulated
        self.batch = batch
        self.scan = scan

    async def resync(self) -> int:
        """Reloads the whole fleet: at start, and now and then as a backstop."""
        async with self.sessionmaker() as session:
            return await self.sync.full(session)

    async def run_pass(self) -> PassResult:
        now = datetime.now(UTC)
        async with self.sessionmaker() as session:
            await self.sync.refresh(session)
            rows = await queue_order.next_jobs(session, now, self.scan)
        fits: list[Row] = []
        reasons: dict[str, str] = {}
        known: dict[Demand, str | None] = {}
        for row in rows:
            demand = demand_of(row, self.allow_simulated)
            if demand not in known:
                # Whether it fits now; the commit below decides for real.
                known[demand] = (
                    None
                    if self.index.choose(demand) is not None
                    else (self.index.why_unplaceable(demand) or WAITING_FOR_CAPACITY)
                )
            reason = known[demand]
            if reason is None and len(fits) < self.batch:
                fits.append(row)
            elif reason is not None and row.waiting_reason != reason:
                reasons[row.id] = reason
        result = PassResult(placements=[], waiting=len(rows) - len(fits))
        if fits:
            async with self.sessionmaker.begin() as session:
                await self._reserve(session, [r.id for r in fits], result)
        if reasons:
            async with self.sessionmaker.begin() as session:
                await _set_waiting_reasons(session, reasons)
        return result

    async def _reserve(self, session: AsyncSession, job_ids: list[str], result: PassResult) -> None:
        # Ours are the ones no other replica holds; taken in the fair order.
        order = {job_id: i for i, job_id in enumerate(job_ids)}
        jobs = (
            await session.scalars(
                select(Job)
                .where(Job.id.in_(job_ids), Job.status == states.QUEUED)
                .with_for_update(skip_locked=True)
            )
        ).all()
        now = datetime.now(UTC)
        # Decided in memory first, each decision seeing the GPUs the earlier ones named,
        # then reserved in Postgres in one statement.
        picks: list[tuple[Job, capacity.Wanted]] = []
        for job in sorted(jobs, key=lambda j: order[j.id]):
            demand = demand_of(job, self.allow_simulated)
            choice = self.index.choose(demand)
            uuids = self.index.pick(choice, demand.count) if choice is not None else None
            if choice is None or uuids is None:
                # Earlier jobs of this pass took what it would have fitted.
                self._wait(job)
                continue
            wanted = capacity.Wanted(
                job.id, choice.provider_id, choice.model, uuids, job.max_price_per_gpu_hour
            )
            picks.append((job, wanted))
        # The jobs' updates go out together at commit (one executemany), not one flush
        # before each reservation.
        with session.no_autoflush:
            reserved = await capacity.reserve_exact(session, [w for _, w in picks])
            for job, wanted in picks:
                reservation = reserved.get(job.id)
                if reservation is None:
                    # Another replica took some of those GPUs, or the machine changed
                    # since we looked: refresh it, and decide again for this job alone.
                    self.index.release(wanted.provider_id, wanted.gpu_uuids)
                    result.races_lost += 1
                    await self.sync.reload(session, [wanted.provider_id])
                    reservation = await self._reserve_one(session, job, result)
                if reservation is None:
                    self._wait(job)
                    continue
                job.status = states.ASSIGNED
                job.waiting_reason = None
                job.not_before = None
                job.provider_id = reservation.provider_id
                job.gpu_uuids = reservation.gpu_uuids
                job.price_per_gpu_hour = reservation.price_per_gpu_hour
                job.gpu_model = reservation.gpu_model
                job.assigned_at = now
                result.placements.append(
                    Placement(provider_id=reservation.provider_id, task=task_for(job, reservation))
                )

    @staticmethod
    def _wait(job: Job) -> None:
        if job.waiting_reason != WAITING_FOR_CAPACITY:
            job.waiting_reason = WAITING_FOR_CAPACITY

    async def _reserve_one(
        self, session: AsyncSession, job: Job, result: PassResult
    ) -> capacity.Reservation | None:
        demand = demand_of(job, self.allow_simulated)
        for _ in range(RACE_RETRIES):
            choice = self.index.choose(demand)
            if choice is None:
                return None
            reservation = await capacity.reserve_in_pool(
                session,
                job.id,
                choice.provider_id,
                choice.model,
                demand.count,
                job.max_price_per_gpu_hour,
            )
            if reservation is not None:
                self.index.take(choice.provider_id, reservation.gpu_uuids)
                return reservation
            # Another replica took those GPUs, the machine changed since we looked, or
            # its rows are locked right now: refresh it, and try the next machine.
            result.races_lost += 1
            await self.sync.reload(session, [choice.provider_id])
            demand = replace(demand, avoid=demand.avoid | {choice.provider_id})
        return None


async def _set_waiting_reasons(session: AsyncSession, reasons: dict[str, str]) -> None:
    await session.execute(
        update(Job).where(Job.status == states.QUEUED).execution_options(synchronize_session=None),
        [{"id": job_id, "waiting_reason": reason} for job_id, reason in sorted(reasons.items())],
    )


async def unassign(session: AsyncSession, job_id: str, attempt: int, reason: str) -> None:
    """Puts an assigned job back in the queue when its task could not be sent."""
    job = await session.get(Job, job_id, with_for_update=True)
    if job is None or job.status != states.ASSIGNED or job.attempt != attempt:
        return
    await capacity.release(session, job.id)
    retries.unplace(job)
    job.waiting_reason = reason
