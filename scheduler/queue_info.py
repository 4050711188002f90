"""Where a queued job stands in the scheduler's order, and when it may start.

The placement pass serves requesters fairly: each requester's own jobs go in (priority
DESC, created_at, id) order, and the next job goes to the requester holding the fewest
GPUs, ties to the one whose next job is older. So a queued job J of owner O starts once O
has received the jobs ahead of J, i.e. when O holds about T = held_O + the GPUs of those
jobs; meanwhile every other requester o gets jobs until it holds about T too:
min(queued_o, T - held_o, plus one if o wins the tie: if it has a job older than J),
counting one GPU per job of theirs.

This is an estimate from one snapshot: jobs ending, new submissions, jobs waiting out a
retry backoff (counted as if ready: they will be by the time J's turn comes), jobs that
fit other machines than J, and jobs nothing can run all make the real order differ.
It costs one statement over the partial indexes ix_jobs_owner_queued and
ix_jobs_owner_active (per-owner aggregates), plus ix_jobs_assigned_at for the rate.
"""

from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler import states
from scheduler.models import Job
from scheduler.schemas import QueueInfo

# The placement rate is measured over this window, or over the last RATE_SAMPLE
# placements when there were more (so a busy fleet costs no more to measure).
RATE_WINDOW_S = 300
RATE_SAMPLE = 1000
# Waiting reasons that say no machine in the fleet can run the job: no start to estimate.
NEVER_PLACEABLE = ("no provider in the fleet", "every machine that could run it")

# Status values are literals, not parameters, so that the planner matches the partial
# indexes under a generic plan of the prepared statement too.
_QUEUE_STATEMENT = text(
    """
    WITH held AS (
        SELECT owner_id, sum(gpus) AS gpus
        FROM jobs
        WHERE status IN ('assigned', 'running')
        GROUP BY owner_id
    ),
    own AS (
        SELECT count(*) AS jobs, coalesce(sum(gpus), 0) AS gpus
        FROM jobs
        WHERE status = 'queued' AND owner_id = :owner_id
          AND (priority > :priority
               OR (priority = :priority
                   AND (created_at < :created_at
                        OR (created_at = :created_at AND id < :job_id))))
    ),
    threshold AS (
        SELECT own.gpus + coalesce((SELECT gpus FROM held WHERE owner_id = :owner_id), 0)
            AS gpus
        FROM own
    ),
    others AS (
        SELECT owner_id, count(*) AS jobs, min(created_at) AS oldest
        FROM jobs
        WHERE status = 'queued' AND owner_id <> :owner_id
        GROUP BY owner_id
    )
    SELECT
        (SELECT jobs FROM own) AS ahead_own,
        (SELECT coalesce(sum(least(
                    others.jobs,
                    greatest(0, threshold.gpus - coalesce(held.gpus, 0)
                                + CASE WHEN others.oldest < :created_at THEN 1 ELSE 0 END))), 0)
         FROM others CROSS JOIN threshold LEFT JOIN held USING (owner_id)) AS ahead_others,
        recent.placements,
        recent.oldest AS oldest_placement,
        now() AS now
    FROM (
        SELECT count(*) AS placements, min(assigned_at) AS oldest
        FROM (
            SELECT assigned_at FROM jobs
            WHERE assigned_at > now() - make_interval(secs => :window_s)
            ORDER BY assigned_at DESC
            LIMIT :sample
        ) AS newest
    ) AS recent
    """
)


def never_placeable(waiting_reason: str | None) -> bool:
    return waiting_reason is not None and waiting_reason.startswith(NEVER_PLACEABLE)


async def queue_info(session: AsyncSession, job: Job) -> QueueInfo | None:
    """The job's estimated place in the queue and start time; None unless it is queued."""
    if job.status != states.QUEUED:
        return None
    row = (
        await session.execute(
            _QUEUE_STATEMENT,
            {
                "owner_id": job.owner_id,
                "priority": job.priority,
                "created_at": job.created_at,
                "job_id": job.id,
                "window_s": RATE_WINDOW_S,
                "sample": RATE_SAMPLE,
            },
        )
    ).one()
    position = int(row.ahead_own) + int(row.ahead_others)
    window_s = float(RATE_WINDOW_S)
    if row.placements >= RATE_SAMPLE:
        window_s = max((row.now - row.oldest_placement).total_seconds(), 1.0)
    return QueueInfo(
        position=position,
        estimated_start_at=estimated_start(
            position, row.placements / window_s, row.now, job.not_before, job.waiting_reason
        ),
    )


def estimated_start(
    position: int,
    rate_per_s: float,
    now: datetime,
    not_before: datetime | None,
    waiting_reason: str | None,
) -> datetime | None:
    """now + (position + 1) / rate, never before not_before; None while nothing is being
    placed or when the fleet can't run the job."""
    if rate_per_s <= 0 or never_placeable(waiting_reason):
        return None
    start = now + timedelta(seconds=(position + 1) / rate_per_s)
    if not_before is not None and not_before > start:
        return not_before
    return start
