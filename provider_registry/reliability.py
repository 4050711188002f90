"""A provider's reliability: how often it was there, and how often its tasks ended
without the machine being at fault, over a sliding window.

    reliability = uptime * task_score
    uptime      = 1 - offline time / time observed in the window
    task_score  = (ok + PRIOR) / (ok + infrastructure + PRIOR)

The prior keeps one unlucky task from sinking a new machine and one lucky task from
crowning it. Time spent draining counts as up: the owner chose it and said so.
"""

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime

from sqlalchemy import (
    Date,
    Float,
    Integer,
    Numeric,
    String,
    bindparam,
    cast,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.ext.asyncio import AsyncSession

from common.db import ArrayRows
from provider_registry.models import LEFT, Provider, ProviderOutage, ProviderTaskDay

PRIOR = 5.0


async def record_task_outcome(
    session: AsyncSession, provider_id: str, infrastructure: bool, day: date | None = None
) -> None:
    """Counts one ended task attempt; the caller makes sure it counts each attempt once."""
    await record_task_outcomes(session, [(provider_id, infrastructure)], day)


async def record_task_outcomes(
    session: AsyncSession, outcomes: Iterable[tuple[str, bool]], day: date | None = None
) -> None:
    """Counts ended task attempts, each a (provider_id, infrastructure) pair, in one
    statement; the caller makes sure it counts each attempt once."""
    ok: Counter[str] = Counter()
    infra: Counter[str] = Counter()
    for provider_id, infrastructure in outcomes:
        (infra if infrastructure else ok)[provider_id] += 1
    if not ok and not infra:
        return
    day = day or datetime.now(UTC).date()
    # One row per provider (an upsert may not touch a row twice), in id order so that
    # concurrent writers lock them in one order. Arrays keep one statement text.
    providers = sorted(ok.keys() | infra.keys())
    await session.execute(
        _COUNT_OUTCOMES,
        {
            "day": day,
            **_COUNTS.params(
                [{"provider_id": p, "ok": ok[p], "infrastructure": infra[p]} for p in providers]
            ),
        },
    )


def _count_outcomes() -> Insert:
    counts = _COUNTS.table
    stmt = insert(ProviderTaskDay.__table__).from_select(
        ["provider_id", "day", "ok", "infrastructure"],
        select(
            counts.c.provider_id,
            bindparam("day", type_=Date),
            counts.c.ok,
            counts.c.infrastructure,
        ),
    )
    return stmt.on_conflict_do_update(
        index_elements=[ProviderTaskDay.provider_id, ProviderTaskDay.day],
        set_={
            "ok": ProviderTaskDay.ok + stmt.excluded.ok,
            "infrastructure": ProviderTaskDay.infrastructure + stmt.excluded.infrastructure,
        },
    )


_COUNTS = ArrayRows("counts", provider_id=String, ok=Integer, infrastructure=Integer)
_COUNT_OUTCOMES = _count_outcomes()


async def recompute(session: AsyncSession, window_days: int) -> int:
    """Refreshes every provider's uptime and reliability; returns how many changed."""
    now = func.now()
    window_start = now - text(f"interval '{int(window_days)} days'")
    observed_from = func.greatest(Provider.created_at, window_start)
    observed_s = func.extract("epoch", now - observed_from)

    downtime = (
        select(
            func.coalesce(
                func.sum(
                    func.extract(
                        "epoch",
                        func.coalesce(ProviderOutage.ended_at, now)
                        - func.greatest(ProviderOutage.started_at, observed_from),
                    )
                ),
                0,
            )
        )
        .where(
            ProviderOutage.provider_id == Provider.id,
            func.coalesce(ProviderOutage.ended_at, now) > observed_from,
        )
        .scalar_subquery()
    )
    cutoff_day = cast(window_start, Date)
    ok = (
        select(func.coalesce(func.sum(ProviderTaskDay.ok), 0))
        .where(ProviderTaskDay.provider_id == Provider.id, ProviderTaskDay.day >= cutoff_day)
        .scalar_subquery()
    )
    infra = (
        select(func.coalesce(func.sum(ProviderTaskDay.infrastructure), 0))
        .where(ProviderTaskDay.provider_id == Provider.id, ProviderTaskDay.day >= cutoff_day)
        .scalar_subquery()
    )
    # Under a minute of history says nothing yet.
    uptime = func.greatest(
        0.0,
        func.least(
            1.0,
            1.0 - cast(downtime, Float) / func.greatest(cast(observed_s, Float), 60.0),
        ),
    )
    task_score = (cast(ok, Float) + PRIOR) / (cast(ok + infra, Float) + literal(PRIOR))
    # Read without locks, write only what changed: a steady fleet costs no row lock, and
    # the heartbeat batches that update the same rows never wait on this.
    rows = (
        await session.execute(
            select(
                Provider.id,
                Provider.uptime,
                Provider.reliability,
                func.round(cast(uptime, Numeric), 4),
                func.round(cast(uptime * task_score, Numeric), 4),
            )
            .where(Provider.state != LEFT)
            # The heartbeat batches' lock order (see liveness.ingest_heartbeats).
            .order_by(Provider.id)
        )
    ).all()
    changed = [
        {"p_id": pid, "p_uptime": float(new_up), "p_reliability": float(new_rel)}
        for pid, old_up, old_rel, new_up, new_rel in rows
        if float(new_up) != old_up or float(new_rel) != old_rel
    ]
    if changed:
        providers = Provider.__table__
        await session.execute(
            update(providers)
            .where(providers.c.id == bindparam("p_id"))
            .values(uptime=bindparam("p_uptime"), reliability=bindparam("p_reliability")),
            changed,
        )
    return len(changed)
