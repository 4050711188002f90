"""The scheduler's metrics. Counters count what this replica did (Prometheus sums the
replicas); the gauges read from the database are the same on every replica (take max)."""

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler import states
from scheduler.models import Job

PLACEMENTS = Counter("scheduler_placements_total", "Jobs assigned to a provider")
PASS_SECONDS = Histogram("scheduler_placement_pass_seconds", "Duration of a placement pass")
QUEUE_DEPTH = Gauge("scheduler_queue_depth", "Jobs queued, at the last lifecycle sweep")
FLEET_MACHINES = Gauge("scheduler_fleet_machines", "Machines in this replica's fleet view")
RACES = Counter(
    "scheduler_reservation_races_total", "Decisions that lost their GPUs to another replica"
)
EVENTS = Counter("scheduler_events_total", "Job events applied", ["type"])
TRANSITIONS = Counter("scheduler_job_transitions_total", "Job state changes", ["status"])
TAKEN_BACK = Counter(
    "scheduler_attempts_taken_back_total",
    "Attempts taken back from their provider",
    ["reason"],
)
PROVIDER_LOSSES = Counter("scheduler_provider_losses_total", "provider.lost events handled")

RETRY_REASONS = ("provider_lost", "not_accepted", "exit_code", "infrastructure")
RETRIES = Counter(
    "scheduler_job_retries_total", "Attempts sent back to the queue for another try", ["reason"]
)

UNFINISHED = (states.QUEUED, states.ASSIGNED, states.RUNNING)
JOBS = Gauge("gpumarket_jobs", "Unfinished jobs by state, at the last lifecycle sweep", ["state"])
QUEUED_GPUS = Gauge("gpumarket_queued_gpus", "GPUs the queued jobs ask for")

# From seconds (an idle fleet) to a day (a queue behind scarce GPUs).
WAIT_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 86400)
WAIT_SECONDS = Histogram(
    "gpumarket_job_wait_seconds",
    "From submission to running (the attempt that ran, retries included)",
    buckets=WAIT_BUCKETS,
)
RUN_BUCKETS = (1, 5, 15, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 3 * 86400)
RUN_SECONDS = Histogram(
    "gpumarket_job_run_seconds",
    "From running to its end, by how it ended",
    ["state"],
    buckets=RUN_BUCKETS,
)

# Present at zero from the start, so rates over them exist before the first event.
for _reason in RETRY_REASONS:
    RETRIES.labels(_reason)
for _state in UNFINISHED:
    JOBS.labels(_state)
for _state in states.TERMINAL:
    RUN_SECONDS.labels(_state)
    TRANSITIONS.labels(_state)


async def observe_unfinished(session: AsyncSession) -> None:
    """Sets the gauges of unfinished jobs. Two queries whose conditions match the partial
    indexes on queued and active jobs: the jobs table keeps every finished job."""
    counts: dict[str, tuple[int, int]] = {}
    for condition in (Job.status == states.QUEUED, Job.status.in_(states.ACTIVE)):
        rows = await session.execute(
            select(Job.status, func.count(), func.coalesce(func.sum(Job.gpus), 0))
            .where(condition)
            .group_by(Job.status)
        )
        counts.update({status: (jobs, gpus) for status, jobs, gpus in rows})
    for state in UNFINISHED:
        JOBS.labels(state).set(counts.get(state, (0, 0))[0])
    queued, queued_gpus = counts.get(states.QUEUED, (0, 0))
    QUEUE_DEPTH.set(queued)
    QUEUED_GPUS.set(queued_gpus)
