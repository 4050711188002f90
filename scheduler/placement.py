"""Placement: match queued jobs to free GPUs and reserve them, atomically.

Optimistic, as Nomad's schedulers do it: each pass decides against an in-memory view of
the fleet (fleet_index, refreshed from the rows changed since the last pass), naming
each job's GPUs, then commits the pass's decisions in Postgres in one statement, where
the GPU rows are locked with SKIP LOCKED and re-checked. Postgres is the referee: a
replica whose view was stale loses the race for those GPUs, reloads that machine and
decides again; no GPU is ever reserved twice.

Jobs are read in fair-share order (queue_order) and locked as they are read, with SKIP
LOCKED, so several replicas split the queue between them instead of waiting on each
other or deciding the same jobs; each replica breaks ties between equally good machines
in its own order (FleetIndex's tie_seed), so their decisions seldom name the same GPUs,
and the jobs that lost a race anyway are decided again together, a statement per round.

The tasks are published after the commit; a task that could not be published goes back
to the queue, and one lost after publishing is caught by the accept deadline (lifecycle).
"""

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.db import one_of
from common.gpu_models import canonical_model
from common.messages import TaskAssignment, TaskInput
from common.types import EGRESS_LABEL, version_number
from provider_registry import capacity
from scheduler import job_store, queue_order, retries, states
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


# Locked already: next_jobs read them FOR UPDATE in the pass's transaction.
_QUEUED_JOBS = select(Job).where(one_of(Job.id, "job_ids"), Job.status == states.QUEUED)


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
        # One transaction: the queued jobs read stay locked (SKIP LOCKED) until the pass
        # commits, so replicas read different jobs instead of all deciding the same head
        # of the queue and all but one finding it taken.
        async with self.sessionmaker.begin() as session:
            # A batch's worth first, so a pass holds no more of the queue than it can
            # place; further down only when some of those fit nowhere now.
            rows = await queue_order.next_jobs(session, now, self.batch)
            if not rows:
                # Nothing to place, or other replicas hold it all: the fleet view can
                # wait for a pass that needs it (a refresh reads every change since).
                return PassResult(placements=[])
            await self.sync.refresh(session)
            triage = _Triage(self.index, self.allow_simulated, self.batch)
            triage.add(rows)
            if len(triage.fits) < self.batch and len(rows) == self.batch < self.scan:
                seen = {row.id for row in rows}
                more = await queue_order.next_jobs(session, now, self.scan)
                triage.add([row for row in more if row.id not in seen])
            result = PassResult(placements=[], waiting=triage.seen - len(triage.fits))
            if triage.fits:
                await self._reserve(session, [r.id for r in triage.fits], result)
            if triage.reasons:
                await _set_waiting_reasons(session, triage.reasons)
        return result

    async def _reserve(self, session: AsyncSession, job_ids: list[str], result: PassResult) -> None:
        order = {job_id: i for i, job_id in enumerate(job_ids)}
        jobs = (await session.scalars(_QUEUED_JOBS, {"job_ids": job_ids})).all()
        # The jobs' changes go out together at the end, not flushed before each statement.
        with session.no_autoflush:
            await self._place(session, sorted(jobs, key=lambda j: order[j.id]), result)
        await job_store.write_changed(session, jobs, _PLACEMENT_COLUMNS)

    async def _place(self, session: AsyncSession, pending: list[Job], result: PassResult) -> None:
        now = datetime.now(UTC)
        # Per job, the machines where it lost a race this pass: their rows may still be
        # locked by the replica that won, so a fresh read can show them free.
        lost_on: dict[str, frozenset[str]] = {}
        for _ in range(1 + RACE_RETRIES):
            picks = self._decide(pending, lost_on)
            reserved = await capacity.reserve_exact(session, [w for _, w in picks])
            pending = []
            for job, wanted in picks:
                reservation = reserved.get(job.id)
                if reservation is None:
                    self.index.release(wanted.provider_id, wanted.gpu_uuids)
                    lost_on[job.id] = lost_on.get(job.id, frozenset()) | {wanted.provider_id}
                    pending.append(job)
                    continue
                _assign(job, reservation, now)
                result.placements.append(
                    Placement(reservation.provider_id, task_for(job, reservation))
                )
            if not pending:
                return
            # Another replica took some of those GPUs, or the machines changed since
            # we looked: read them again, then decide again for those jobs together
            # (a statement per round, however many jobs lost).
            result.races_lost += len(pending)
            await self.sync.reload(session, {p for job in pending for p in lost_on[job.id]})
        for job in pending:
            _wait(job)

    def _decide(
        self, jobs: list[Job], lost_on: dict[str, frozenset[str]]
    ) -> list[tuple[Job, capacity.Wanted]]:
        """Names each job's GPUs in memory, each decision seeing the GPUs the earlier
        ones named; jobs that fit nowhere now are marked waiting."""
        picks: list[tuple[Job, capacity.Wanted]] = []
        for job in jobs:
            demand = demand_of(job, self.allow_simulated)
            if job.id in lost_on:
                demand = replace(demand, avoid=demand.avoid | lost_on[job.id])
            choice = self.index.choose(demand)
            uuids = self.index.pick(choice, demand.count) if choice is not None else None
            if choice is None or uuids is None:
                _wait(job)
                continue
            picks.append(
                (
                    job,
                    capacity.Wanted(
                        job.id, choice.provider_id, choice.model, uuids, job.max_price_per_gpu_hour
                    ),
                )
            )
        return picks


class _Triage:
    """Sorts the jobs read into those that fit somewhere now (up to a batch, in order)
    and those that don't, with why; the reservation then decides for real."""

    def __init__(self, index: FleetIndex, allow_simulated: bool, batch: int) -> None:
        self.index = index
        self.allow_simulated = allow_simulated
        self.batch = batch
        self.fits: list[Row] = []
        self.reasons: dict[str, str] = {}  # job id -> a new waiting_reason
        self.seen = 0
        self._known: dict[Demand, str | None] = {}

    def add(self, rows: list[Row]) -> None:
        self.seen += len(rows)
        for row in rows:
            demand = demand_of(row, self.allow_simulated)
            if demand not in self._known:
                self._known[demand] = (
                    None
                    if self.index.choose(demand) is not None
                    else (self.index.why_unplaceable(demand) or WAITING_FOR_CAPACITY)
                )
            reason = self._known[demand]
            if reason is None and len(self.fits) < self.batch:
                self.fits.append(row)
            elif reason is not None and row.waiting_reason != reason:
                self.reasons[row.id] = reason


# What _assign and _wait write.
_PLACEMENT_COLUMNS = (
    "status",
    "waiting_reason",
    "not_before",
    "provider_id",
    "gpu_uuids",
    "price_per_gpu_hour",
    "gpu_model",
    "assigned_at",
)


def _assign(job: Job, reservation: capacity.Reservation, now: datetime) -> None:
    job.status = states.ASSIGNED
    job.waiting_reason = None
    job.not_before = None
    job.provider_id = reservation.provider_id
    job.gpu_uuids = reservation.gpu_uuids
    job.price_per_gpu_hour = reservation.price_per_gpu_hour
    job.gpu_model = reservation.gpu_model
    job.assigned_at = now


def _wait(job: Job) -> None:
    if job.waiting_reason != WAITING_FOR_CAPACITY:
        job.waiting_reason = WAITING_FOR_CAPACITY


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
