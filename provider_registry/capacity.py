"""GPU reservations: the scheduler calls these inside its own transaction.

A GPU has exactly one owner at a time: reservations lock the GPU rows with
SKIP LOCKED, so concurrent scheduler replicas never pick the same GPU and never wait
on each other.
"""

from dataclasses import dataclass, replace
from decimal import Decimal

from sqlalchemy import Select, and_, func, select, true, update
from sqlalchemy.ext.asyncio import AsyncSession

from common.gpu_models import canonical_model
from provider_registry.models import ONLINE, Gpu, Provider

# Providers looked at per placement; beyond the cheapest few, prices barely differ.
CANDIDATE_PROVIDERS = 20


@dataclass(frozen=True)
class GpuRequest:
    count: int
    models: list[str] | None = None
    min_vram_mb: int | None = None
    max_price_per_hour: Decimal | None = None
    allow_simulated: bool = False


@dataclass(frozen=True)
class Reservation:
    provider_id: str
    gpu_uuids: list[str]
    price_per_gpu_hour: Decimal


def _matching(request: GpuRequest) -> list:
    conditions = []
    if request.models:
        conditions.append(Gpu.model.in_([canonical_model(m) for m in request.models]))
    if request.min_vram_mb:
        conditions.append(Gpu.vram_mb >= request.min_vram_mb)
    if request.max_price_per_hour is not None:
        conditions.append(Gpu.price_per_hour <= request.max_price_per_hour)
    if not request.allow_simulated:
        conditions.append(Gpu.simulated.is_(False))
    return conditions


def _free_on_online(request: GpuRequest) -> list:
    return [
        *_matching(request),
        Gpu.reserved_job_id.is_(None),
        Gpu.healthy.is_(True),
        Provider.state == ONLINE,
        Provider.suspended_reason.is_(None),
    ]


async def reserve(
    session: AsyncSession, job_id: str, request: GpuRequest, avoid: list[str] | None = None
) -> Reservation | None:
    """Reserves `count` matching GPUs on one machine for the job, or returns None.

    `avoid` names machines to skip (where this job already hit an infrastructure fault).
    """
    # Cheapest machines that look like they have room; the row locks below decide.
    candidates: Select = (
        select(Gpu.provider_id, func.max(Gpu.price_per_hour).label("price"))
        .join(Provider, Provider.id == Gpu.provider_id)
        .where(*_free_on_online(request), Gpu.provider_id.not_in(avoid or []))
        .group_by(Gpu.provider_id, Provider.id)
        .having(func.count() >= request.count)
        # At one price, the machine most likely to finish the job.
        .order_by("price", Provider.reliability.desc(), Gpu.provider_id)
        .limit(CANDIDATE_PROVIDERS)
    )
    for provider_id, _ in (await session.execute(candidates)).all():
        locked = (
            await session.scalars(
                select(Gpu)
                .join(Provider, Provider.id == Gpu.provider_id)
                .where(Gpu.provider_id == provider_id, *_free_on_online(request))
                .order_by(Gpu.price_per_hour, Gpu.index)
                .limit(request.count)
                .with_for_update(of=Gpu, skip_locked=True)
            )
        ).all()
        if len(locked) < request.count:
            continue  # another scheduler holds some of them; try the next machine
        for gpu in locked:
            gpu.reserved_job_id = job_id
        await session.flush()
        return Reservation(
            provider_id=provider_id,
            gpu_uuids=[g.uuid for g in locked],
            price_per_gpu_hour=max(g.price_per_hour for g in locked),
        )
    return None


async def release(session: AsyncSession, job_id: str) -> int:
    """Frees every GPU the job holds; returns how many were freed (0 on a replay)."""
    result = await session.execute(
        update(Gpu).where(Gpu.reserved_job_id == job_id).values(reserved_job_id=None)
    )
    return result.rowcount or 0


async def _machines_with(
    session: AsyncSession, request: GpuRequest, avoid: list[str] | None = None
) -> int:
    per_machine = (
        select(Gpu.provider_id)
        .where(and_(true(), *_matching(request)), Gpu.provider_id.not_in(avoid or []))
        .group_by(Gpu.provider_id)
        .having(func.count() >= request.count)
    )
    return await session.scalar(select(func.count()).select_from(per_machine.subquery())) or 0


async def why_unplaceable(
    session: AsyncSession, request: GpuRequest, avoid: list[str] | None = None
) -> str | None:
    """Why no machine in the fleet could ever run this request; None if some machine could.

    Looks at every known machine whatever its state or load: a job that fits a busy or
    offline machine is waiting, not impossible. Constraints are added one at a time so
    the reason names the first one that nothing satisfies.
    """
    if await _machines_with(session, request, avoid):
        return None
    if avoid and await _machines_with(session, request):
        return (
            "every machine that could run it already failed this job with an "
            "infrastructure fault; waiting for another provider"
        )
    probe = GpuRequest(count=1, allow_simulated=request.allow_simulated)
    if not await _machines_with(session, probe):
        return "no provider in the fleet has any GPU" + (
            "" if request.allow_simulated else " (simulated GPUs are not offered to real jobs)"
        )
    constraints = [
        ("models", request.models, f"of model {' or '.join(request.models or [])}"),
        (
            "min_vram_mb",
            request.min_vram_mb,
            f"with at least {(request.min_vram_mb or 0) / 1024:g} GiB of memory",
        ),
        (
            "max_price_per_hour",
            request.max_price_per_hour,
            f"at or under {request.max_price_per_hour} per GPU-hour",
        ),
    ]
    described: list[str] = []
    for field, value, label in constraints:
        if not value:
            continue
        probe = replace(probe, **{field: value})
        described.append(label)
        if not await _machines_with(session, probe):
            return f"no provider in the fleet has a GPU {' '.join(described)}"
    return f"no provider in the fleet has {request.count} such GPUs on one machine"
