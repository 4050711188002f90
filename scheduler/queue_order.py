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

from sqlalchemy import Integer, Row, Select, String, bindparam, func, select, text, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from common.db import one_of
from scheduler import states
from scheduler.models import Job

# Distinct requesters with queued jobs, by a skip scan over ix_jobs_owner_queued
# (one index probe per requester instead of reading every queued job).
_OWNERS = text(
    """
    WITH RECURSIVE owners AS (
        (SELECT owner_id FROM jobs WHERE status = 'queued' ORDER BY owner_id LIMIT 1)
        UNION ALL
        SELECT (
            SELECT j.owner_id FROM jobs j
            WHERE j.status = 'queued' AND j.owner_id > owners.owner_id
            ORDER BY j.owner_id LIMIT 1
        )
        FROM owners WHERE owners.owner_id IS NOT NULL
    )
    SELECT owner_id FROM owners WHERE owner_id IS NOT NULL LIMIT :max_owners
    """
)

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


_HELD = (
    select(Job.owner_id, func.sum(Job.gpus))
    .where(Job.status.in_(states.ACTIVE), one_of(Job.owner_id, "owners"))
    .group_by(Job.owner_id)
)


async def held_gpus(session: AsyncSession, owners: list[str]) -> dict[str, int]:
    rows = await session.execute(_HELD, {"owners": owners})
    return {owner: int(total) for owner, total in rows}


def _next_jobs() -> Select:
    owner_ids = (
        func.unnest(bindparam("owners", type_=ARRAY(String)))
        .table_valued("owner_id")
        .render_derived(name="o")
    )
    now = bindparam("now", type_=Job.not_before.type)
    mine = (
        select(*COLUMNS)
        .where(
            Job.status == states.QUEUED,
            Job.owner_id == owner_ids.c.owner_id,
            (Job.not_before.is_(None)) | (Job.not_before <= now),
        )
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(bindparam("per_owner", type_=Integer))
        .with_for_update(skip_locked=True)
        .lateral("j")
    )
    return select(mine).select_from(owner_ids.join(mine, true()))


_NEXT_JOBS = _next_jobs()


async def next_jobs(session: AsyncSession, now: datetime, limit: int) -> list[Row]:
    """Up to `limit` queued jobs ready to run (backoff over) and not held by another
    replica, in the order above, locked until the caller's transaction ends."""
    owners = list((await session.scalars(_OWNERS, {"max_owners": MAX_OWNERS})).all())
    if not owners:
        return []
    held = await held_gpus(session, owners)
    # Enough of each requester's jobs to fill the pass however the shares fall out.
    per_owner = min(limit, max(16, 4 * limit // len(owners)))
    rows = await session.execute(_NEXT_JOBS, {"owners": owners, "now": now, "per_owner": per_owner})
    return fair_merge(list(rows), held, limit)


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
