"""The order in which queued jobs are offered GPUs: priority within a requester, fair
share between requesters.

Each requester's own jobs go in (priority DESC, created_at, id) order. Between
requesters, the next job goes to the one holding the fewest GPUs (its assigned and
running jobs, plus what this pass already picked for it), ties to the earlier job. So a
requester with a burst of 10,000 queued jobs cannot hold back another requester's single
job: that job is the other requester's first, and it comes up in the next pass. A
requester's `priority` reorders only its own jobs; it cannot buy its way past others.

The jobs are locked as they are read, skipping those another scheduler replica holds,
until the caller's transaction ends: replicas read disjoint slices of the queue.
"""

import heapq
from collections import defaultdict
from datetime import datetime

from sqlalchemy import Integer, Row, text
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.models import Job

# What placement needs of a job, without the heavier columns it never reads.
COLUMNS = (
    Job.id,
    Job.owner_id,
    Job.priority,
    Job.created_at,
    Job.attempt,
    Job.gpus,
    Job.gpu_models,
    Job.min_vram_gb,
    Job.min_compute_capability,
    Job.min_cuda_version,
    Job.region,
    Job.labels,
    Job.cpus,
    Job.memory_gb,
    Job.egress,
    Job.max_price_per_gpu_hour,
    Job.avoid_providers,
    Job.waiting_reason,
)

MAX_OWNERS = 10_000

# One statement (it was three round trips): the distinct requesters with queued jobs,
# by a skip scan over ix_jobs_owner_queued (one index probe per requester instead of
# reading every queued job); the GPUs each one holds now (ix_jobs_owner_active, whose
# statuses are written out so that the partial index matches in a generic plan too);
# and enough of each one's ready jobs to fill the pass however the shares fall out,
# read in its own order and locked, skipping those another replica holds.
_NEXT_JOBS = text(
    f"""
    WITH RECURSIVE owners AS (
        (SELECT owner_id FROM jobs WHERE status = 'queued' ORDER BY owner_id LIMIT 1)
        UNION ALL
        SELECT (
            SELECT q.owner_id FROM jobs q
            WHERE q.status = 'queued' AND q.owner_id > owners.owner_id
            ORDER BY q.owner_id LIMIT 1
        )
        FROM owners WHERE owners.owner_id IS NOT NULL
    ),
    o AS (SELECT owner_id FROM owners WHERE owner_id IS NOT NULL LIMIT :max_owners),
    -- No row (so no division by zero) when no requester has queued jobs.
    share AS (
        SELECT least(l.n, greatest(16, 4 * l.n / count(*))) AS per_owner
        FROM o, (SELECT CAST(:limit AS bigint) AS n) l GROUP BY l.n
    )
    SELECT j.*, h.held
    FROM o, share, LATERAL (
        SELECT coalesce(sum(a.gpus), 0) AS held FROM jobs a
        WHERE a.owner_id = o.owner_id AND a.status IN ('assigned', 'running')
    ) h, LATERAL (
        SELECT {", ".join(column.expression.name for column in COLUMNS)} FROM jobs
        WHERE status = 'queued' AND owner_id = o.owner_id
            AND (not_before IS NULL OR not_before <= :now)
        ORDER BY priority DESC, created_at, id
        LIMIT share.per_owner
        FOR UPDATE SKIP LOCKED
    ) j
    """
).columns(*COLUMNS, held=Integer)


async def next_jobs(session: AsyncSession, now: datetime, limit: int) -> list[Row]:
    """Up to `limit` queued jobs ready to run (backoff over) and not held by another
    replica, in the order above, locked until the caller's transaction ends."""
    rows = (
        await session.execute(_NEXT_JOBS, {"max_owners": MAX_OWNERS, "limit": limit, "now": now})
    ).all()
    return fair_merge(rows, {row.owner_id: row.held for row in rows}, limit)


def fair_merge(rows: list[Row], held: dict[str, int], limit: int) -> list[Row]:
    """Interleaves the requesters' own queues, fewest GPUs held first."""
    queues: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        queues[row.owner_id].append(row)
    for queue in queues.values():
        queue.sort(key=lambda r: (-r.priority, r.created_at, r.id))
        queue.reverse()  # pop() from the end
    heap = [(held.get(owner, 0), q[-1].created_at, owner) for owner, q in queues.items()]
    heapq.heapify(heap)
    ordered: list[Row] = []
    while heap and len(ordered) < limit:
        usage, _, owner = heapq.heappop(heap)
        queue = queues[owner]
        row = queue.pop()
        ordered.append(row)
        if queue:
            heapq.heappush(heap, (usage + row.gpus, queue[-1].created_at, owner))
    return ordered
