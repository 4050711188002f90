"""GPU reservations: the scheduler calls these inside its own transaction.

A GPU has exactly one owner at a time: reservations lock the GPU rows with
SKIP LOCKED, so concurrent scheduler replicas never pick the same GPU and never wait
on each other. Which machine to try is the scheduler's choice (scheduler/fleet_index.py);
whether its GPUs are still free is decided here.
"""

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import ColumnElement, Numeric, Row, String, Update, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from common.db import ArrayRows, one_of
from provider_registry.models import ONLINE, Gpu, Provider


@dataclass(frozen=True)
class Reservation:
    provider_id: str
    gpu_uuids: list[str]
    price_per_gpu_hour: Decimal
    gpu_model: str


def _reservable() -> list[ColumnElement[bool]]:
    """A GPU that may be reserved now: free and healthy, on a machine that is online and
    not suspended (with the gpus joined to their providers)."""
    gpus, providers = Gpu.__table__.c, Provider.__table__.c
    return [
        gpus.reserved_job_id.is_(None),
        gpus.healthy.is_(True),
        providers.state == ONLINE,
        providers.suspended_reason.is_(None),
    ]


async def release(session: AsyncSession, job_id: str) -> int:
    """Frees every GPU the job holds; returns how many were freed (0 on a replay)."""
    gpus = Gpu.__table__.c
    result = await session.execute(
        update(Gpu.__table__).where(gpus.reserved_job_id == job_id).values(reserved_job_id=None)
    )
    return result.rowcount or 0


def _release_many() -> Update:
    gpus = Gpu.__table__.c
    # The rows as locked, so RETURNING can say whose they were (it sees the new row).
    held = (
        select(gpus.id, gpus.reserved_job_id)
        .where(one_of(gpus.reserved_job_id, "job_ids"))
        .order_by(gpus.id)
        .with_for_update()
        .cte("held")
    )
    return (
        update(Gpu.__table__)
        .where(gpus.id == held.c.id)
        .values(reserved_job_id=None)
        .returning(held.c.reserved_job_id)
    )


_RELEASE_MANY = _release_many()


async def release_many(session: AsyncSession, job_ids: Collection[str]) -> dict[str, int]:
    """Frees every GPU these jobs hold, in one statement; returns how many each job had
    (jobs that held none are left out)."""
    if not job_ids:
        return {}
    rows = await session.execute(_RELEASE_MANY, {"job_ids": list(job_ids)})
    return dict(Counter(rows.scalars()))


@dataclass(frozen=True)
class Wanted:
    """Exactly these GPUs of one machine for one job, at most `max_price_per_hour` each."""

    job_id: str
    provider_id: str
    model: str
    gpu_uuids: list[str]
    max_price_per_hour: Decimal | None = None


# Arrays, not a VALUES list: one statement text whatever the number of GPUs.
_ASKED = ArrayRows(
    "asked", job_id=String, provider_id=String, model=String, uuid=String, max_price=Numeric(12, 6)
)


def _reserve() -> Update:
    gpus, providers = Gpu.__table__.c, Provider.__table__.c
    asked = _ASKED.table
    # Per asked GPU, one lookup by its unique (provider_id, uuid): a subquery that locks
    # rows is not flattened into a join, so no plan can turn this around into a scan of
    # every free GPU against every asked one (what a generic plan, which cannot see the
    # arrays' length, chose: 300,000 comparisons for a pass of 100 jobs on 3,000 GPUs).
    # SKIP LOCKED never waits, so the order the rows are locked in cannot deadlock.
    gpu = (
        select(gpus.id)
        .join_from(Gpu.__table__, Provider.__table__, providers.id == gpus.provider_id)
        .where(
            gpus.provider_id == asked.c.provider_id,
            gpus.uuid == asked.c.uuid,
            gpus.model == asked.c.model,
            *_reservable(),
            asked.c.max_price.is_(None) | (gpus.price_per_hour <= asked.c.max_price),
        )
        .with_for_update(of=Gpu.__table__, skip_locked=True)
        .lateral("gpu")
    )
    free = select(gpu.c.id, asked.c.job_id).select_from(asked.join(gpu, true())).cte("free")
    return (
        update(Gpu.__table__)
        .where(gpus.id == free.c.id)
        .values(reserved_job_id=free.c.job_id)
        .returning(free.c.job_id, gpus.uuid, gpus.index, gpus.price_per_hour)
    )


_RESERVE = _reserve()


async def reserve_exact(session: AsyncSession, wanted: list[Wanted]) -> dict[str, Reservation]:
    """Reserves the named GPUs of many jobs in one statement: a placement pass's worth.

    The scheduler named each job's GPUs from its view of the fleet; a job gets its
    reservation only if every one of them is still free, healthy, within its price, on
    a machine that is online and not suspended, and not locked by another replica right
    now (SKIP LOCKED: replicas never wait on each other). A job that got some of its GPUs
    but not all gets none (a partial hold helps nobody) and is left out of the answer.
    """
    if not wanted:
        return {}
    asked = [
        {
            "job_id": w.job_id,
            "provider_id": w.provider_id,
            "model": w.model,
            "uuid": uuid,
            "max_price": w.max_price_per_hour,
        }
        for w in wanted
        for uuid in w.gpu_uuids
    ]
    rows = (await session.execute(_RESERVE, _ASKED.params(asked))).all()
    got: dict[str, list[Row]] = {}
    for row in rows:
        got.setdefault(row.job_id, []).append(row)
    reservations, partial = {}, []
    for w in wanted:
        mine = sorted(got.get(w.job_id, []), key=lambda r: r.index)
        if len(mine) < len(w.gpu_uuids):
            if mine:
                partial.append(w.job_id)
            continue
        reservations[w.job_id] = Reservation(
            provider_id=w.provider_id,
            gpu_uuids=[r.uuid for r in mine],
            price_per_gpu_hour=max(r.price_per_hour for r in mine),
            gpu_model=w.model,
        )
    await release_many(session, partial)
    return reservations
