"""Keeps a FleetIndex in step with the registry's tables.

Every change that matters to placement gives the changed `providers` or `gpus` row a new
`capacity_seq` and records the writing transaction in `capacity_xid` (triggers,
migrations 0005 and 0009), so a refresh reads only the rows written by transactions that
had not ended at its last look, and reloads the machines with a value it has not
applied yet. Rows come back as plain tuples (no ORM objects) and
become numpy columns; the index groups GPUs into pools with numpy, so a full load of
100,000 machines takes seconds.
"""

import asyncio
import gc
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Float,
    Integer,
    Select,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    select,
    true,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncSession

from common.db import one_of
from provider_registry.models import LEFT, ONLINE, Gpu, Provider
from scheduler.fleet_index import FleetIndex, FleetSnapshot

# Machines per reload statement, to keep its arrays and results reasonable.
_BATCH = 5000

# Every transaction with a lower id had ended when this statement began.
_XMIN = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
_HORIZON = select(literal_column(_XMIN, BigInteger).label("xmin"))


def version_sql(column: Any) -> ColumnElement[int]:
    """common.types.version_number in SQL: '8.9' -> 8009, '12' -> 12000, junk -> NULL."""
    return case(
        (
            column.op("~")(r"^[0-9]{1,6}(\.[0-9]{0,6})?$"),
            cast(func.split_part(column, ".", 1), Integer) * 1000
            + func.coalesce(cast(func.nullif(func.split_part(column, ".", 2), ""), Integer), 0),
        ),
        else_=None,
    )


def _machines_query() -> Select:
    return select(
        Provider.id,
        and_(Provider.state == ONLINE, Provider.suspended_reason.is_(None)),
        Provider.simulated,
        Provider.region,
        # As text, parsed once per distinct value: most machines share their labels.
        cast(Provider.labels, Text),
        Provider.reliability,
        func.coalesce(version_sql(Provider.cuda_version), -1),
        Provider.cpu_count,
        Provider.memory_mb,
        Provider.capacity_seq,
        Provider.state == LEFT,
        Provider.capacity_xid,
    )


def _gpus_query() -> Select:
    return select(
        Gpu.provider_id,
        Gpu.uuid,
        Gpu.model,
        Gpu.vram_mb,
        func.coalesce(version_sql(Gpu.compute_capability), -1),
        cast(Gpu.price_per_hour, Float),
        Gpu.healthy,
        Gpu.reserved_job_id.is_not(None),
        Gpu.capacity_seq,
        Gpu.capacity_xid,
    )


def _changes() -> Select:
    """This statement's horizon, and the machines and GPUs changed since the last one
    (a row with only the horizon when none): `+ 0` because the cap is a filter; the
    index to read by is capacity_xid's."""
    last, since = bindparam("horizon"), bindparam("since")
    changed = union_all(
        select(Provider.id.label("provider_id"), Provider.capacity_seq.label("seq")).where(
            Provider.capacity_xid >= last, Provider.capacity_seq + 0 > since
        ),
        select(Gpu.provider_id, Gpu.capacity_seq).where(
            Gpu.capacity_xid >= last, Gpu.capacity_seq + 0 > since
        ),
    ).subquery("changed")
    horizon = _HORIZON.subquery("horizon")
    return select(
        horizon.c.xmin.label("horizon"), changed.c.provider_id, changed.c.seq
    ).select_from(horizon.outerjoin(changed, true()))


_CHANGES = _changes()
_MACHINES_OF = _machines_query().where(one_of(Provider.id, "provider_ids")).order_by(Provider.id)
_GPUS_OF = _gpus_query().where(one_of(Gpu.provider_id, "provider_ids"))


@contextmanager
def _collector_paused() -> Iterator[None]:
    """A full load makes millions of objects (rows, strings, lists), none in a cycle.

    The cyclic collector would walk them again and again while they are made (doubling
    the load's time), and then on every full collection afterwards: a pause of 100 ms
    or more at 100,000 machines, in the middle of some placement decision. So it is
    paused during the load, and what the load kept is then frozen out of its sight
    (gc.freeze). Frozen objects are still freed by reference counting when the index
    drops them; garbage in cycles is collected first, so none of it is frozen.
    """
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class FleetSync:
    """Loads the fleet into `index` (`full`), then keeps it current (`refresh`).

    What a refresh reads: a capacity_seq value is taken before its transaction commits,
    so a transaction can commit a value lower than one a refresh has already read (it
    took its value first but committed last). A refresh therefore notes the horizon of
    its snapshot (every transaction below it had ended) and the next one reads the rows
    written by transactions at or above it: those that ended since, and those still
    open, whose rows it will read again once they commit. It reloads the machines among
    them with a value it has not applied yet. That is the last moment's changes, however
    many there were, where a fixed window of the last `lookback` values had to be wide
    enough for the busiest moment (5,000 values: thousands of rows read again per pass).

    `lookback` still caps the values a refresh looks at, for a transaction left open
    for minutes (it holds the horizon back): past that, its commit waits for the next
    `full`, which the scheduler runs periodically as a backstop.

    Calls take turns (a lock): a reload that read rows before an overlapping `full`
    and applied them after it would otherwise leave the index behind the database.
    """

    def __init__(self, index: FleetIndex, lookback: int = 100_000) -> None:
        self.index = index
        self.lookback = lookback
        self.high = 0  # the highest capacity_seq read so far
        # Every transaction below this id had ended at the last look.
        self.horizon = 0
        # The values, of rows a refresh may read again, that the index reflects: a row
        # showing one of these has not changed since it was loaded.
        self._applied: set[int] = set()
        self._lock = asyncio.Lock()
        # Rows the last refresh read (changed, or written since the look before).
        self.reread = 0

    async def full(self, session: AsyncSession) -> int:
        """Replaces the index's content with every machine that has not left."""
        async with self._lock:
            return await self._full(session)

    async def _full(self, session: AsyncSession) -> int:
        horizon = await session.scalar(_HORIZON)
        high = await session.scalar(
            select(
                func.greatest(
                    select(func.max(Provider.capacity_seq)).scalar_subquery(),
                    select(func.max(Gpu.capacity_seq)).scalar_subquery(),
                )
            )
        )
        live = select(Provider.id).where(Provider.state != LEFT)
        with _collector_paused():
            machines = (
                await session.execute(
                    _machines_query().where(Provider.state != LEFT).order_by(Provider.id)
                )
            ).all()
            gpus = (await session.execute(_gpus_query().where(Gpu.provider_id.in_(live)))).all()
            self.horizon = horizon
            self.high = max(self.high, high or 0)
            snapshot, seqs = _snapshot(machines, gpus, self._since, horizon)
            self.index.load(snapshot)
            del machines, gpus  # while the collector is still paused
        self._applied = set(seqs)
        return len(self.index)

    @property
    def _since(self) -> int:
        return self.high - self.lookback

    async def refresh(self, session: AsyncSession) -> int:
        """Reloads the machines changed since the last look; returns how many."""
        async with self._lock:
            return await self._refresh(session)

    async def _refresh(self, session: AsyncSession) -> int:
        found = (
            await session.execute(_CHANGES, {"horizon": self.horizon, "since": self._since})
        ).all()
        horizon = found[0].horizon
        rows = [(r.provider_id, r.seq) for r in found if r.provider_id is not None]
        self.reread = len(rows)
        stale = {provider_id for provider_id, seq in rows if seq not in self._applied}
        # What the next refresh can read again: these rows (applied already, or by the
        # reload below) and whatever the reload reads.
        self._applied = set()
        self._remember([seq for _, seq in rows])
        await self._reload(session, stale)
        self.horizon = horizon
        return len(stale)

    async def reload(self, session: AsyncSession, provider_ids: Iterable[str]) -> None:
        """Reads these machines again (after a reservation that lost a race, say);
        machines that left or no longer exist leave the index."""
        async with self._lock:
            await self._reload(session, provider_ids)

    async def _reload(self, session: AsyncSession, provider_ids: Iterable[str]) -> None:
        wanted = sorted(set(provider_ids))
        for start in range(0, len(wanted), _BATCH):
            batch = wanted[start : start + _BATCH]
            machines = (await session.execute(_MACHINES_OF, {"provider_ids": batch})).all()
            gpus = (await session.execute(_GPUS_OF, {"provider_ids": batch})).all()
            snapshot, seqs = _snapshot(machines, gpus, self._since, self.horizon)
            present = set(snapshot.provider_ids)
            for provider_id in batch:
                if provider_id not in present:
                    self.index.remove(provider_id)  # left, or deleted
            self.index.upsert_many(snapshot)
            self._remember(seqs)

    def _remember(self, seqs: list[int]) -> None:
        self.high = max(self.high, max(seqs, default=0))
        self._applied.update(seqs)


def _snapshot(
    machines: Sequence[Any], gpus: Sequence[Any], since: int, horizon: int
) -> tuple[FleetSnapshot, list[int]]:
    """The snapshot of these rows but the machines that left, and the capacity_seq values
    above `since` of the rows a refresh may read again (written at or above `horizon`)."""
    m = list(zip(*machines, strict=True)) or [()] * 12
    g = list(zip(*gpus, strict=True)) or [()] * 10
    seqs = np.concatenate([np.asarray(m[9], dtype=np.int64), np.asarray(g[8], dtype=np.int64)])
    xids = np.concatenate([np.asarray(m[11], dtype=np.int64), np.asarray(g[9], dtype=np.int64)])
    if any(m[10]):
        m = list(zip(*(row for row in machines if not row[10]), strict=True)) or [()] * 12
    position = {provider_id: i for i, provider_id in enumerate(m[0])}
    gpu_machine = np.fromiter(map(position.get, g[0], repeat(-1)), np.int64, len(g[0]))
    if (gpu_machine < 0).any():  # GPUs of machines that left, or appeared in between
        keep = gpu_machine >= 0
        g = [np.asarray(column)[keep].tolist() for column in g]
        gpu_machine = gpu_machine[keep]
    parsed: dict[str, dict[str, str]] = {}
    labels = []
    for raw in m[4]:
        found = parsed.get(raw)
        if found is None:
            loaded = json.loads(raw) if raw else {}
            found = parsed[raw] = {str(k): str(v) for k, v in loaded.items()}
        labels.append(found)
    snapshot = FleetSnapshot.from_gpus(
        provider_ids=list(m[0]),
        schedulable=m[1],
        simulated=m[2],
        regions=list(m[3]),
        labels=labels,
        reliability=m[5],
        cuda_version=m[6],
        cpu_count=m[7],
        memory_mb=m[8],
        gpu_machine=gpu_machine,
        gpu_uuid=g[1],
        gpu_model=g[2],
        gpu_vram_mb=g[3],
        gpu_compute_capability=g[4],
        gpu_price_per_hour=g[5],
        gpu_healthy=g[6],
        gpu_reserved=g[7],
    )
    return snapshot, seqs[(seqs > since) & (xids >= horizon)].tolist()
