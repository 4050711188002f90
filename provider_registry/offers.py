"""The market: free GPUs on online machines, searched like Vast.ai's offers.

One offer is one machine's free GPUs of one model. Filters narrow the GPUs and the
machines; sorting and paging work over the offers.
"""

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, and_, cast, false, func, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession

from common.gpu_models import model_tokens
from provider_registry.models import ONLINE, Gpu, Provider
from provider_registry.schemas import Offer, OfferFilters, OfferPage, OfferSort


@dataclass(frozen=True)
class OfferQuery:
    models: list[str] = field(default_factory=list)
    min_vram_gb: float | None = None
    min_compute_capability: str | None = None
    min_cuda_version: str | None = None
    max_price: Decimal | None = None
    regions: list[str] = field(default_factory=list)
    min_reliability: float | None = None
    # Free GPUs of the model on one machine, for multi-GPU jobs.
    min_gpus: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    include_simulated: bool = False
    sort: OfferSort = "price"
    limit: int = 50
    offset: int = 0


def query_from(filters: OfferFilters, include_simulated: bool) -> OfferQuery:
    return OfferQuery(
        models=list(filters.model),
        min_vram_gb=filters.min_vram_gb,
        min_compute_capability=filters.min_compute_capability,
        min_cuda_version=filters.min_cuda_version,
        max_price=filters.max_price,
        regions=list(filters.region),
        min_reliability=filters.min_reliability,
        min_gpus=filters.min_gpus,
        labels=filters.labels(),
        include_simulated=include_simulated,
        sort=filters.sort,
        limit=filters.limit,
        offset=filters.offset,
    )


def version_at_least(column: Any, version: str) -> ColumnElement[bool]:
    """ "8.9" <= "10.0" as numbers, not as text; `version` is validated as N.N by callers."""
    wanted = [int(part) for part in version.split(".")]
    return cast(func.string_to_array(column, "."), ARRAY(Integer)) >= cast(wanted, ARRAY(Integer))


def model_filter(column: Any, models: list[str]) -> ColumnElement[bool]:
    """`column` (a canonical model name) matches one of `models`, as model_matches says:
    every word of a requested model is a word of the GPU's model, so "H100" finds
    "H100 80GB HBM3" and "RTX 4090" does not find "RTX 3090"."""
    alternatives = []
    for requested in models:
        tokens = model_tokens(requested)
        if tokens:
            words = [rf"(^|[^A-Z0-9]){re.escape(t)}([^A-Z0-9]|$)" for t in tokens]
            alternatives.append(and_(*(column.op("~")(w) for w in words)))
    return or_(*alternatives) if alternatives else false()


def _gpu_filters(q: OfferQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if q.models:
        conditions.append(model_filter(Gpu.model, q.models))
    if q.min_vram_gb is not None:
        conditions.append(Gpu.vram_mb >= int(q.min_vram_gb * 1024))
    if q.max_price is not None:
        conditions.append(Gpu.price_per_hour <= q.max_price)
    if q.min_compute_capability:
        conditions.append(version_at_least(Gpu.compute_capability, q.min_compute_capability))
    return conditions


def _machine_filters(q: OfferQuery) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = [
        Provider.state == ONLINE,
        Provider.suspended_reason.is_(None),
    ]
    if not q.include_simulated:
        conditions.append(Provider.simulated.is_(False))
    if q.regions:
        conditions.append(Provider.region.in_(q.regions))
    if q.min_cuda_version:
        conditions.append(version_at_least(Provider.cuda_version, q.min_cuda_version))
    if q.min_reliability is not None:
        conditions.append(Provider.reliability >= q.min_reliability)
    if q.labels:
        conditions.append(Provider.labels.contains(q.labels))
    return conditions


# Free GPUs of one model on one machine: not held by a job, and healthy.
FREE = func.count().filter(and_(Gpu.reserved_job_id.is_(None), Gpu.healthy.is_(True)))


def _offers(q: OfferQuery, *columns: Any) -> Select:
    """The offers matching `q`, one row per machine and model, with `columns`."""
    return (
        select(*columns)
        .select_from(Provider)
        .join(Gpu, Gpu.provider_id == Provider.id)
        .where(*_machine_filters(q), *_gpu_filters(q))
        .group_by(Provider.id, Gpu.model)
        .having(FREE >= max(1, q.min_gpus))
    )


async def search_offers(session: AsyncSession, q: OfferQuery) -> OfferPage:
    price = func.max(Gpu.price_per_hour)
    vram = func.min(Gpu.vram_mb)
    order = {
        "price": [price.asc()],
        "-price": [price.desc()],
        "reliability": [Provider.reliability.asc()],
        "-reliability": [Provider.reliability.desc()],
        "vram": [vram.asc()],
        "-vram": [vram.desc()],
        "free_gpus": [FREE.asc()],
        "-free_gpus": [FREE.desc()],
    }[q.sort]
    query = (
        _offers(
            q,
            Provider.id,
            Provider.name,
            Provider.region,
            Provider.labels,
            Provider.cuda_version,
            Provider.driver_version,
            Provider.reliability,
            Provider.simulated,
            Gpu.model,
            vram,
            func.max(Gpu.compute_capability),
            func.min(Gpu.pcie_gen),
            func.min(Gpu.pcie_width),
            price,
            FREE,
            func.count(),
            func.count().over(),
        )
        .order_by(*order, Provider.reliability.desc(), price.asc(), Provider.id, Gpu.model)
        .limit(q.limit)
        .offset(q.offset)
    )
    rows = (await session.execute(query)).all()
    offers = [
        Offer(
            provider_id=r[0],
            provider_name=r[1],
            region=r[2],
            labels=r[3] or {},
            cuda_version=r[4],
            driver_version=r[5],
            reliability=r[6],
            simulated=r[7],
            model=r[8],
            vram_gb=round(r[9] / 1024, 1),
            compute_capability=r[10],
            pcie_gen=r[11],
            pcie_width=r[12],
            price_per_gpu_hour=r[13],
            free_gpus=r[14],
            total_gpus=r[15],
        )
        for r in rows
    ]
    total = rows[0][16] if rows else await _count(session, q)
    return OfferPage(offers=offers, total=total, limit=q.limit, offset=q.offset)


async def _count(session: AsyncSession, q: OfferQuery) -> int:
    """The total when the page itself is empty (an offset past the end)."""
    if q.offset == 0:
        return 0
    grouped = _offers(q, Provider.id).subquery()
    return await session.scalar(select(func.count()).select_from(grouped)) or 0
