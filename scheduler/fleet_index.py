"""The scheduler's in-memory view of the fleet, for optimistic placement (Nomad-style).

A placement is decided here against a snapshot, then committed in Postgres with row
locks; a reservation that loses a race there just reloads the machine and tries again.

The index is a set of *pools*: one machine's GPUs of one model. Every pool is a row of
preallocated numpy columns (grown by doubling; removed rows go to a free list), and
machine attributes are copied onto each of its pools (machines nearly always have one),
so a decision is a handful of vectorized comparisons over all pools with no gather
and no Python loop over machines.
"""

import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from common.gpu_models import model_tokens
from common.types import EGRESS_LABEL

# `kind` and `sched` values per pool row.
_EMPTY, _REAL, _SIMULATED = 0, 1, 2
# Label columns hold value ids; this means "the machine has no such key".
_ABSENT = -1

INFRASTRUCTURE_FAULTS = (
    "every machine that could run it already failed this job with an infrastructure "
    "fault; waiting for another provider"
)


@dataclass(frozen=True)
class GpuView:
    uuid: str
    index: int
    model: str  # canonical (canonical_model)
    vram_mb: int
    compute_capability: int | None  # common.types.version_number("8.9") == 8009
    price_per_hour: float
    healthy: bool
    reserved: bool  # held by a job


@dataclass(frozen=True)
class MachineView:
    provider_id: str
    schedulable: bool  # online and not suspended (may take new work)
    simulated: bool
    region: str | None
    labels: dict[str, str]
    reliability: float  # 0..1
    cuda_version: int | None  # version_number
    cpu_count: int | None
    memory_mb: int | None
    gpus: tuple[GpuView, ...]


@dataclass(frozen=True)
class Demand:
    count: int
    models: tuple[str, ...] = ()
    min_vram_mb: int | None = None
    min_compute_capability: int | None = None  # version_number
    min_cuda_version: int | None = None  # version_number
    max_price_per_hour: float | None = None
    region: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    cpus: float | None = None
    memory_mb: int | None = None
    allow_simulated: bool = False
    avoid: frozenset[str] = frozenset()  # provider ids to skip


@dataclass(frozen=True)
class Choice:
    provider_id: str
    model: str
    price_per_hour: float
    score: float


@dataclass(frozen=True)
class Weights:
    """Score = price x price + reliability x (1 - reliability) + packing x (share of the
    machine left free after placing); lower wins."""

    price: float = 1.0
    reliability: float = 0.01
    packing: float = 0.0001


@dataclass
class FleetSnapshot:
    """Machines and their pools column by column: what `FleetIndex.load` and
    `FleetIndex.upsert_many` take. FleetSync builds one straight from SQL rows,
    `from_machines` from views; either way no Python object per GPU is needed.

    Unknown values: -1 for integers, NaN for cpu_count and memory_mb. A pool's vram,
    compute_capability and price are over its healthy GPUs (-1, -1, inf when none is
    healthy); the `*_all` ones over all its GPUs.
    """

    # One entry per machine (each machine at most once).
    provider_ids: list[str]
    schedulable: np.ndarray  # bool
    simulated: np.ndarray  # bool
    regions: list[str | None]
    labels: list[dict[str, str]]
    reliability: np.ndarray  # float64
    cuda_version: np.ndarray  # int, version_number
    cpu_count: np.ndarray  # float64
    memory_mb: np.ndarray  # float64
    # One entry per pool.
    pool_machine: np.ndarray  # int: its machine's position above
    pool_model: list[str]
    n_all: np.ndarray
    n_free: np.ndarray
    vram_mb: np.ndarray
    compute_capability: np.ndarray
    price_per_hour: np.ndarray
    vram_mb_all: np.ndarray
    compute_capability_all: np.ndarray
    price_per_hour_all: np.ndarray
    pool_start: np.ndarray  # its GPUs are [pool_start, pool_end) below
    pool_end: np.ndarray
    # One entry per GPU, grouped by pool. The index keeps these and updates `reserved`.
    gpu_uuid: list[str]
    gpu_healthy: np.ndarray  # bool
    gpu_reserved: np.ndarray  # bool

    @classmethod
    def from_gpus(
        cls,
        *,
        provider_ids: list[str],
        schedulable: Sequence[bool],
        simulated: Sequence[bool],
        regions: list[str | None],
        labels: list[dict[str, str]],
        reliability: Sequence[float],
        cuda_version: Sequence[int],
        cpu_count: Sequence[float | None],
        memory_mb: Sequence[float | None],
        gpu_machine: Sequence[int],
        gpu_uuid: Sequence[str],
        gpu_model: Sequence[str],
        gpu_vram_mb: Sequence[int],
        gpu_compute_capability: Sequence[int],
        gpu_price_per_hour: Sequence[float],
        gpu_healthy: Sequence[bool],
        gpu_reserved: Sequence[bool],
    ) -> "FleetSnapshot":
        """Groups GPUs (one entry each, `gpu_machine` their machine's position among the
        machines) into pools, with numpy. A machine's uuids must be distinct."""
        names = {name: i for i, name in enumerate(dict.fromkeys(gpu_model))}
        model = np.fromiter(map(names.__getitem__, gpu_model), np.int64, len(gpu_model))
        width = max(1, len(names))
        key = np.asarray(gpu_machine, dtype=np.int64) * width + model
        order = np.argsort(key, kind="stable")
        key = key[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else key[:0]
        healthy = np.asarray(gpu_healthy, dtype=bool)[order]
        reserved = np.asarray(gpu_reserved, dtype=bool)[order]
        vram = np.asarray(gpu_vram_mb, dtype=np.int64)[order]
        cc = np.asarray(gpu_compute_capability, dtype=np.int64)[order]
        price = np.asarray(gpu_price_per_hour, dtype=np.float64)[order]

        def per_pool(ufunc: np.ufunc, values: np.ndarray) -> np.ndarray:
            return ufunc.reduceat(values, starts) if len(starts) else values[:0]

        big = np.iinfo(np.int64).max
        none_healthy = per_pool(np.add, healthy.astype(np.int64)) == 0
        vram_h = per_pool(np.minimum, np.where(healthy, vram, big))
        vram_h[none_healthy] = -1
        cc_h = per_pool(np.minimum, np.where(healthy, cc, big))
        cc_h[none_healthy] = _ABSENT
        price_h = per_pool(np.maximum, np.where(healthy, price, -math.inf))
        price_h[none_healthy] = math.inf

        ends = np.append(starts[1:], len(key)) if len(starts) else starts
        pool_key = key[starts]
        model_names = list(names)
        return cls(
            provider_ids=provider_ids,
            schedulable=np.asarray(schedulable, dtype=bool),
            simulated=np.asarray(simulated, dtype=bool),
            regions=regions,
            labels=labels,
            reliability=np.asarray(reliability, dtype=np.float64),
            cuda_version=np.asarray(cuda_version, dtype=np.int64),
            # None becomes NaN: unknown.
            cpu_count=np.asarray(cpu_count, dtype=np.float64),
            memory_mb=np.asarray(memory_mb, dtype=np.float64),
            pool_machine=pool_key // width,
            pool_model=[model_names[m] for m in (pool_key % width).tolist()],
            n_all=ends - starts,
            n_free=per_pool(np.add, (healthy & ~reserved).astype(np.int64)),
            vram_mb=vram_h,
            compute_capability=cc_h,
            price_per_hour=price_h,
            vram_mb_all=per_pool(np.minimum, vram),
            compute_capability_all=per_pool(np.minimum, cc),
            price_per_hour_all=per_pool(np.maximum, price),
            pool_start=starts.astype(np.int64),
            pool_end=ends,
            gpu_uuid=list(map(gpu_uuid.__getitem__, order.tolist())),
            gpu_healthy=healthy,
            gpu_reserved=reserved,
        )

    @classmethod
    def from_machines(cls, machines: Iterable[MachineView]) -> "FleetSnapshot":
        machines = list(machines)
        gpus = [
            (position, gpu)
            for position, machine in enumerate(machines)
            for gpu in {g.uuid: g for g in machine.gpus}.values()
        ]
        return cls.from_gpus(
            provider_ids=[m.provider_id for m in machines],
            schedulable=[m.schedulable for m in machines],
            simulated=[m.simulated for m in machines],
            regions=[m.region for m in machines],
            labels=[dict(m.labels) for m in machines],
            reliability=[m.reliability for m in machines],
            cuda_version=[_ABSENT if m.cuda_version is None else m.cuda_version for m in machines],
            cpu_count=[m.cpu_count for m in machines],
            memory_mb=[m.memory_mb for m in machines],
            gpu_machine=[p for p, _ in gpus],
            gpu_uuid=[g.uuid for _, g in gpus],
            gpu_model=[g.model for _, g in gpus],
            gpu_vram_mb=[g.vram_mb for _, g in gpus],
            gpu_compute_capability=[_cc(g) for _, g in gpus],
            gpu_price_per_hour=[g.price_per_hour for _, g in gpus],
            gpu_healthy=[g.healthy for _, g in gpus],
            gpu_reserved=[g.reserved for _, g in gpus],
        )


class _Machine:
    __slots__ = ("free", "label_keys", "pools", "provider_id", "rows", "seq", "snapshot")

    def __init__(self, provider_id: str, seq: int, label_keys: tuple[str, ...]) -> None:
        self.provider_id = provider_id
        self.seq = seq  # its rank among machines of equal score (FleetIndex.tie_seed)
        self.label_keys = label_keys
        self.rows: list[int] = []  # its pools' rows
        # Its GPUs: the snapshot it came in, and (row, start, end) per pool there.
        self.snapshot: FleetSnapshot | None = None
        self.pools: list[tuple[int, int, int]] = []
        self.free = 0


def _version(number: int) -> str:
    return f"{number // 1000}.{number % 1000}"


class FleetIndex:
    """Machines and their GPU pools, searched with numpy; see the module docstring.

    Not thread-safe: one event loop owns it. Every method is synchronous, so a reader
    never sees a machine half-updated.
    """

    # One row per pool: (name, dtype, value while the row is unused).
    _COLUMNS = (
        ("kind", np.uint8, _EMPTY),  # _REAL or _SIMULATED while the row is in use
        ("sched", np.uint8, _EMPTY),  # the kind if the machine may take work, else _EMPTY
        ("seq", np.int64, 0),  # the machine's rank in ties (_Machine.seq)
        ("model", np.int32, 0),
        ("n_all", np.int32, 0),  # GPUs, whatever their health or load
        ("n_free", np.int32, 0),  # healthy and not reserved
        # Of the healthy GPUs (for choose) and of all of them (for why_unplaceable).
        ("vram", np.int64, -1),
        ("cc", np.int32, _ABSENT),
        ("price", np.float64, math.inf),
        ("vram_all", np.int64, -1),
        ("cc_all", np.int32, _ABSENT),
        ("price_all", np.float64, math.inf),
        # The machine's, repeated on each of its pools.
        ("region", np.int32, _ABSENT),
        ("reliability", np.float64, 0.0),
        ("cuda", np.int32, _ABSENT),
        ("cpu", np.float64, math.nan),
        ("mem", np.float64, math.nan),
        ("m_gpus", np.int32, 1),
        ("m_free", np.int32, 0),
        # The score without its `count` term, and that term's factor (see _rescore).
        ("base", np.float64, math.inf),
        ("pack", np.float64, 0.0),
    )

    def __init__(self, weights: Weights = Weights(), tie_seed: int | None = None) -> None:
        """Among machines of equal score, the one known first wins; with a `tie_seed`,
        the first in an order of the machines' ids shuffled by that seed. Scheduler
        replicas each draw their own seed: deciding the same head of the queue, they
        then name different GPUs instead of all racing for the first tied machine's.
        The order stays the same for the life of the index, reloads included, so a
        replica keeps filling the machines it started on."""
        self._weights = weights
        self._tie_key = None if tie_seed is None else tie_seed.to_bytes(16, "little", signed=True)
        self.clear()

    @property
    def weights(self) -> Weights:
        return self._weights

    @weights.setter
    def weights(self, weights: Weights) -> None:
        self._weights = weights
        self._rescore(np.flatnonzero(self._c_kind[: self._high] != _EMPTY))

    def clear(self) -> None:
        """Forgets everything."""
        self._machines: dict[str, _Machine] = {}
        self._seq = 0
        self._capacity = 0
        self._high = 0  # rows [0, _high) have been used
        self._free_rows: list[int] = []
        self._row_owner: list[_Machine | None] = []
        self._cols: dict[str, np.ndarray] = {}
        self._model_names: list[str] = []
        self._model_ids: dict[str, int] = {}
        self._model_words: list[frozenset[str]] = []
        self._model_luts: dict[tuple[str, ...], np.ndarray] = {}
        self._region_ids: dict[str, int] = {}
        # Per label key, each row's value id (or _ABSENT): one comparison filters a label.
        self._label_cols: dict[str, np.ndarray] = {}
        self._label_values: dict[str, dict[str, int]] = {}
        self._grow(1024)

    # -- storage -----------------------------------------------------------------

    def _grow(self, capacity: int) -> None:
        def grown(old: np.ndarray | None, dtype: type, fill: float) -> np.ndarray:
            new = np.full(capacity, fill, dtype=dtype)
            if old is not None:
                new[: len(old)] = old
            return new

        for name, dtype, fill in self._COLUMNS:
            self._cols[name] = grown(self._cols.get(name), dtype, fill)
            # Plain attributes: these are read on the hot path of every decision.
            setattr(self, f"_c_{name}", self._cols[name])
        for key, column in self._label_cols.items():
            self._label_cols[key] = grown(column, np.int32, _ABSENT)
        self._row_owner.extend([None] * (capacity - self._capacity))
        self._capacity = capacity

    def _allocate(self, count: int) -> np.ndarray:
        reuse = min(count, len(self._free_rows))
        reused = self._free_rows[len(self._free_rows) - reuse :] if reuse else []
        del self._free_rows[len(self._free_rows) - reuse :]
        fresh = count - reuse
        if self._high + fresh > self._capacity:
            capacity = self._capacity
            while capacity < self._high + fresh:
                capacity *= 2
            self._grow(capacity)
        rows = np.array(reused + list(range(self._high, self._high + fresh)), dtype=np.int64)
        self._high += fresh
        return rows

    def _drop(self, machines: Iterable[_Machine]) -> None:
        """Frees the rows of these machines, resetting every column there."""
        rows: list[int] = []
        by_key: dict[str, list[int]] = {}
        for machine in machines:
            rows += machine.rows
            for key in machine.label_keys:
                by_key.setdefault(key, []).extend(machine.rows)
            machine.rows = []
            machine.pools = []
            machine.snapshot = None
        if not rows:
            return
        if len(rows) == 1:
            for name, _, fill in self._COLUMNS:
                self._cols[name][rows[0]] = fill
        else:
            index = np.array(rows, dtype=np.int64)
            for name, _, fill in self._COLUMNS:
                self._cols[name][index] = fill
        for key, key_rows in by_key.items():
            self._label_cols[key][key_rows] = _ABSENT
        for row in rows:
            self._row_owner[row] = None
        self._free_rows += rows

    def _ids(self, names: list[str], ids: dict[str, int], on_new: Callable[[str], None]) -> list:
        out = []
        for name in names:
            found = ids.get(name)
            if found is None:
                found = ids[name] = len(ids)
                on_new(name)
            out.append(found)
        return out

    def _rank(self, provider_id: str) -> int:
        if self._tie_key is None:
            self._seq += 1
            return self._seq
        digest = hashlib.blake2b(provider_id.encode(), digest_size=8, salt=self._tie_key)
        return int.from_bytes(digest.digest(), "little") >> 1  # fits int64

    def _new_model(self, model: str) -> None:
        self._model_names.append(model)
        self._model_words.append(frozenset(model_tokens(model)))

    def _rescore(self, rows: np.ndarray | int) -> None:
        """score(count) = base - count x pack, where, with w the weights,
        base = w.price x price + w.reliability x (1 - reliability)
               + w.packing x machine_free / machine_gpus
        pack = w.packing / machine_gpus, so a decision costs two vector operations."""
        w = self._weights
        gpus = self._c_m_gpus[rows].astype(np.float64)
        self._c_pack[rows] = w.packing / gpus
        self._c_base[rows] = (
            w.price * self._c_price[rows]
            + w.reliability * (1.0 - self._c_reliability[rows])
            + w.packing * self._c_m_free[rows] / gpus
        )

    # -- updates -----------------------------------------------------------------

    def load(self, snapshot: FleetSnapshot) -> None:
        """Replaces the whole content with `snapshot`'s machines."""
        self.clear()
        self.upsert_many(snapshot)

    def upsert(self, machine: MachineView) -> None:
        """Replaces all that is known of this machine."""
        self.upsert_many(FleetSnapshot.from_machines([machine]))

    def upsert_many(self, s: FleetSnapshot) -> None:
        """Replaces all that is known of each machine in `s` (vectorized)."""
        known = [self._machines.get(p) for p in s.provider_ids]
        self._drop(m for m in known if m is not None)
        machines: list[_Machine] = []
        for provider_id, labels, machine in zip(s.provider_ids, s.labels, known, strict=True):
            if machine is None:
                machine = self._machines[provider_id] = _Machine(
                    provider_id, self._rank(provider_id), ()
                )
            machine.label_keys = tuple(labels)
            machines.append(machine)
        if not len(s.pool_model):
            return
        rows = self._allocate(len(s.pool_model))
        pm = s.pool_machine

        kind = np.where(s.simulated, _SIMULATED, _REAL).astype(np.uint8)
        regions = self._ids(
            [r for r in s.regions if r is not None], self._region_ids, lambda _: None
        )
        region_ids = np.full(len(machines), _ABSENT, dtype=np.int32)
        region_ids[[i for i, r in enumerate(s.regions) if r is not None]] = regions
        m_gpus = np.bincount(pm, weights=s.n_all, minlength=len(machines)).astype(np.int64)
        m_free = np.bincount(pm, weights=s.n_free, minlength=len(machines)).astype(np.int64)
        c = self._cols
        c["model"][rows] = self._ids(s.pool_model, self._model_ids, self._new_model)
        c["kind"][rows] = kind[pm]
        c["sched"][rows] = np.where(s.schedulable, kind, _EMPTY)[pm]
        c["seq"][rows] = np.array([m.seq for m in machines], dtype=np.int64)[pm]
        c["n_all"][rows] = s.n_all
        c["n_free"][rows] = s.n_free
        c["vram"][rows] = s.vram_mb
        c["cc"][rows] = s.compute_capability
        c["price"][rows] = s.price_per_hour
        c["vram_all"][rows] = s.vram_mb_all
        c["cc_all"][rows] = s.compute_capability_all
        c["price_all"][rows] = s.price_per_hour_all
        c["region"][rows] = region_ids[pm]
        c["reliability"][rows] = s.reliability[pm]
        c["cuda"][rows] = s.cuda_version[pm]
        c["cpu"][rows] = s.cpu_count[pm]
        c["mem"][rows] = s.memory_mb[pm]
        c["m_gpus"][rows] = m_gpus[pm]
        c["m_free"][rows] = m_free[pm]
        self._rescore(rows)
        self._write_labels(s.labels, rows, pm)

        owner = self._row_owner
        for row, position, start, end in zip(
            rows.tolist(), pm.tolist(), s.pool_start.tolist(), s.pool_end.tolist(), strict=True
        ):
            machine = machines[position]
            owner[row] = machine
            machine.rows.append(row)
            machine.pools.append((row, start, end))
        for machine, free in zip(machines, m_free.tolist(), strict=True):
            machine.free = free
            machine.snapshot = s

    def _write_labels(self, labels: list[dict[str, str]], rows: np.ndarray, pm: np.ndarray) -> None:
        per_key: dict[str, tuple[list[int], list[int]]] = {}
        for position, machine_labels in enumerate(labels):
            for key, value in machine_labels.items():
                values = self._label_values.setdefault(key, {})
                value_id = values.setdefault(str(value), len(values))
                positions, ids = per_key.setdefault(key, ([], []))
                positions.append(position)
                ids.append(value_id)
        for key, (positions, ids) in per_key.items():
            column = self._label_cols.get(key)
            if column is None:
                column = self._label_cols[key] = np.full(self._capacity, _ABSENT, np.int32)
            by_machine = np.full(len(labels), _ABSENT, dtype=np.int32)
            by_machine[positions] = ids
            column[rows] = by_machine[pm]

    def remove(self, provider_id: str) -> None:
        machine = self._machines.pop(provider_id, None)
        if machine is not None:
            self._drop([machine])

    def take(self, provider_id: str, uuids: Iterable[str]) -> None:
        """Marks GPUs reserved (after their reservation in Postgres succeeded)."""
        self._mark(provider_id, uuids, reserved=True)

    def pick(self, choice: Choice, count: int) -> list[str] | None:
        """Names `count` free healthy GPUs of the chosen pool and marks them reserved, so
        the pass's next decisions see them taken; None if the pool has too few. The
        reservation in Postgres then decides, and `release` undoes a pick it refused."""
        machine = self._machines.get(choice.provider_id)
        if machine is None:
            return None
        s = machine.snapshot
        assert s is not None
        picked: list[str] = []
        for row, start, end in machine.pools:
            if self._model_names[self._c_model[row]] != choice.model:
                continue
            for i in range(start, end):
                if s.gpu_healthy[i] and not s.gpu_reserved[i]:
                    picked.append(s.gpu_uuid[i])
                    if len(picked) == count:
                        self.take(choice.provider_id, picked)
                        return picked
        return None

    def release(self, provider_id: str, uuids: Iterable[str]) -> None:
        """Marks GPUs free again."""
        self._mark(provider_id, uuids, reserved=False)

    def _mark(self, provider_id: str, uuids: Iterable[str], reserved: bool) -> None:
        machine = self._machines.get(provider_id)
        if machine is None:
            return
        wanted = set(uuids)
        change = 0
        s = machine.snapshot
        for row, start, end in machine.pools:
            for i in range(start, end):
                if s.gpu_uuid[i] in wanted and s.gpu_reserved[i] != reserved:
                    s.gpu_reserved[i] = reserved
                    if s.gpu_healthy[i]:
                        step = -1 if reserved else 1
                        self._c_n_free[row] += step
                        change += step
        if change:
            machine.free += change
            for row in machine.rows:
                self._c_m_free[row] = machine.free
                self._rescore(row)

    # -- queries -----------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._machines)

    def __contains__(self, provider_id: object) -> bool:
        return provider_id in self._machines

    def _model_lut(self, models: tuple[str, ...]) -> np.ndarray:
        """model id -> whether it is one of `models` (model_matches), cached per tuple."""
        lut = self._model_luts.get(models)
        if lut is None or len(lut) != len(self._model_names):
            wanted = [w for w in (frozenset(model_tokens(m)) for m in models) if w]
            lut = np.fromiter(
                (any(w <= words for w in wanted) for words in self._model_words),
                dtype=bool,
                count=len(self._model_words),
            )
            if len(self._model_luts) >= 4096:
                self._model_luts.clear()
            self._model_luts[models] = lut
        return lut

    def _label_matches(
        self, labels: tuple[tuple[str, str], ...]
    ) -> list[tuple[np.ndarray, int]] | None:
        """(column, value id) per wanted label; None if no machine has one of them."""
        found = []
        for key, value in labels:
            value_id = self._label_values.get(key, {}).get(str(value))
            if value_id is None or key not in self._label_cols:
                return None
            found.append((self._label_cols[key], value_id))
        return found

    def choose(self, demand: Demand) -> Choice | None:
        """The best pool with `demand.count` free GPUs on a schedulable machine."""
        n = self._high
        count = max(1, demand.count)
        mask = self._c_n_free[:n] >= count
        sched = self._c_sched[:n]
        mask &= (sched != _EMPTY) if demand.allow_simulated else (sched == _REAL)
        if demand.models:
            lut = self._model_lut(demand.models)
            if not lut.any():
                return None
            mask &= lut[self._c_model[:n]]
        if demand.min_vram_mb:
            mask &= self._c_vram[:n] >= demand.min_vram_mb
        if demand.min_compute_capability is not None:
            mask &= self._c_cc[:n] >= demand.min_compute_capability
        if demand.min_cuda_version is not None:
            mask &= self._c_cuda[:n] >= demand.min_cuda_version
        if demand.max_price_per_hour is not None:
            mask &= self._c_price[:n] <= demand.max_price_per_hour
        if demand.region is not None:
            region = self._region_ids.get(demand.region)
            if region is None:
                return None
            mask &= self._c_region[:n] == region
        if demand.labels:
            labels = self._label_matches(demand.labels)
            if labels is None:
                return None
            for column, value_id in labels:
                mask &= column[:n] == value_id
        if demand.cpus:
            mask &= self._c_cpu[:n] * count >= demand.cpus * self._c_m_gpus[:n]
        if demand.memory_mb:
            mask &= self._c_mem[:n] * count >= demand.memory_mb * self._c_m_gpus[:n]
        self._exclude(mask, demand.avoid)

        candidates = np.count_nonzero(mask)
        if not candidates:
            return None
        if candidates * 16 < n:  # few: gather them
            rows = np.flatnonzero(mask)
            score = self._c_base[rows] - count * self._c_pack[rows]
        else:  # many: cheaper over every row than gathering
            rows = None
            score = np.where(mask, self._c_base[:n] - count * self._c_pack[:n], np.inf)
        best = score.min()
        ties = np.flatnonzero(score == best)
        seq = self._c_seq if rows is None else self._c_seq[rows]
        pick = ties[0] if len(ties) == 1 else ties[np.argmin(seq[ties])]
        row = int(pick if rows is None else rows[pick])
        owner = self._row_owner[row]
        assert owner is not None
        return Choice(
            provider_id=owner.provider_id,
            model=self._model_names[self._c_model[row]],
            price_per_hour=float(self._c_price[row]),
            score=float(best),
        )

    def _exclude(self, mask: np.ndarray, avoid: Iterable[str]) -> None:
        for provider_id in avoid:
            known = self._machines.get(provider_id)
            if known is not None:
                mask[known.rows] = False

    def why_unplaceable(self, demand: Demand) -> str | None:
        """Why no known machine could ever run `demand`; None if one could.

        Load, state and health are ignored: a job that fits a busy, offline or broken
        machine is waiting, not impossible. Constraints are added one at a time, so the
        sentence names the first one that nothing in the fleet satisfies.
        """
        n = self._high
        count = max(1, demand.count)
        kind = self._c_kind[:n]
        probe = (kind != _EMPTY) if demand.allow_simulated else (kind == _REAL)
        probe &= self._c_n_all[:n] >= 1
        steps = self._static_masks(demand, n)
        whole = probe & (self._c_n_all[:n] >= count)
        for _, mask in steps:
            whole &= mask
        if whole.any():
            self._exclude(whole, demand.avoid)
            return None if whole.any() else INFRASTRUCTURE_FAULTS
        if not probe.any():
            return "no provider in the fleet has any GPU" + (
                "" if demand.allow_simulated else " (simulated GPUs are not offered to real jobs)"
            )
        described: list[str] = []
        for words, mask in steps:
            probe &= mask
            described.append(words)
            if not probe.any():
                return f"no provider in the fleet has a GPU {' '.join(described)}"
        return f"no provider in the fleet has {count} such GPUs on one machine"

    def _static_masks(self, d: Demand, n: int) -> list[tuple[str, np.ndarray]]:
        """(words for the sentence, rows that meet it) per constraint the demand sets, in
        the order the sentence adds them; over all GPUs of a pool, whatever their health."""
        nothing = np.zeros(n, dtype=bool)
        count = max(1, d.count)
        steps: list[tuple[str, np.ndarray]] = []
        if d.models:
            lut = self._model_lut(d.models)
            matching = lut[self._c_model[:n]] if lut.any() else nothing
            steps.append((f"of model {' or '.join(d.models)}", matching))
        if d.min_vram_mb:
            steps.append(
                (
                    f"with at least {d.min_vram_mb / 1024:g} GiB of memory",
                    self._c_vram_all[:n] >= d.min_vram_mb,
                )
            )
        if d.min_compute_capability is not None:
            steps.append(
                (
                    f"with compute capability {_version(d.min_compute_capability)} or newer",
                    self._c_cc_all[:n] >= d.min_compute_capability,
                )
            )
        if d.min_cuda_version is not None:
            steps.append(
                (
                    f"on a machine with CUDA {_version(d.min_cuda_version)} or newer",
                    self._c_cuda[:n] >= d.min_cuda_version,
                )
            )
        if d.max_price_per_hour is not None:
            steps.append(
                (
                    f"at or under {d.max_price_per_hour:g} per GPU-hour",
                    self._c_price_all[:n] <= d.max_price_per_hour,
                )
            )
        if d.region is not None:
            region = self._region_ids.get(d.region)
            in_region = nothing if region is None else self._c_region[:n] == region
            steps.append((f"in region {d.region}", in_region))
        if d.labels:
            labels = self._label_matches(d.labels)
            labelled = nothing if labels is None else ~nothing
            for column, value_id in labels or ():
                labelled &= column[:n] == value_id
            words = ", ".join(f"{k}={v}" for k, v in d.labels if (k, v) != EGRESS_LABEL)
            what = f"labelled {words}" if words else ""
            if EGRESS_LABEL in d.labels:
                what = " and ".join(filter(None, ["that allows network access (egress)", what]))
            steps.append((what, labelled))
        # A job's share of the machine's CPUs and memory grows with its GPUs.
        if d.cpus:
            steps.append(
                (
                    f"on a machine that can spare {d.cpus:g} CPUs for {_gpus(count)}",
                    self._c_cpu[:n] * count >= d.cpus * self._c_m_gpus[:n],
                )
            )
        if d.memory_mb:
            steps.append(
                (
                    f"on a machine that can spare {d.memory_mb / 1024:g} GiB of RAM for "
                    f"{_gpus(count)}",
                    self._c_mem[:n] * count >= d.memory_mb * self._c_m_gpus[:n],
                )
            )
        return steps


def _gpus(count: int) -> str:
    return "1 GPU" if count == 1 else f"{count} GPUs"


def _cc(gpu: GpuView) -> int:
    return _ABSENT if gpu.compute_capability is None else gpu.compute_capability


_BENCH_MODELS = (
    ("H100 80GB HBM3", 81920, 9000, 2.5),
    ("H100 PCIE", 81920, 9000, 2.0),
    ("A100-SXM4-80GB", 81920, 8000, 1.3),
    ("A100-PCIE-40GB", 40960, 8000, 1.0),
    ("L40S", 46068, 8009, 0.9),
    ("RTX 4090", 24564, 8009, 0.4),
    ("RTX 4090 D", 24564, 8009, 0.35),
    ("RTX 3090", 24576, 8006, 0.25),
    ("A10", 23028, 8006, 0.3),
    ("L4", 23034, 8009, 0.3),
    ("T4", 15360, 7005, 0.1),
    ("B200", 184320, 10000, 5.0),
)
_BENCH_REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south", "ap-east")


def synthetic_fleet(machines: int, seed: int = 0) -> FleetIndex:
    """An index of `machines` made-up machines: mixed models, prices, regions and labels,
    1 to 8 GPUs each, about a third partly or fully busy, a few offline or simulated."""
    rng = random.Random(seed)
    views = []
    for m in range(machines):
        model, vram, cc, price = rng.choice(_BENCH_MODELS)
        price = round(price * rng.uniform(0.7, 1.4), 3)
        count = rng.choice((1, 1, 2, 4, 4, 8, 8))
        busy = rng.randint(0, count) if rng.random() < 0.35 else 0
        labels = {"tier": rng.choice(("gold", "silver", "bronze"))}
        if rng.random() < 0.2:
            labels["nvlink"] = "yes"
        if rng.random() < 0.05:
            labels["host"] = f"h{m}"
        provider_id = f"p{m:07d}"
        # A few machines mix two models.
        second = rng.choice(_BENCH_MODELS) if rng.random() < 0.03 else None
        views.append(
            MachineView(
                provider_id=provider_id,
                schedulable=rng.random() > 0.05,
                simulated=rng.random() < 0.02,
                region=rng.choice(_BENCH_REGIONS),
                labels=labels,
                reliability=round(rng.uniform(0.8, 1.0), 3),
                cuda_version=rng.choice((11008, 12002, 12004, 12008)),
                cpu_count=rng.choice((8, 16, 32, 64, 128, None)),
                memory_mb=rng.choice((32768, 65536, 262144, 1048576, None)),
                gpus=tuple(
                    GpuView(
                        uuid=f"GPU-{provider_id}-{i}",
                        index=i,
                        model=model,
                        vram_mb=vram,
                        compute_capability=cc,
                        price_per_hour=price,
                        healthy=rng.random() > 0.01,
                        reserved=i < busy,
                    )
                    for i in range(count)
                )
                + (
                    ()
                    if second is None
                    else (GpuView(f"GPU-{provider_id}-x", count, *second, True, False),)
                ),
            )
        )
    index = FleetIndex()
    index.load(FleetSnapshot.from_machines(views))
    return index


_BENCH_DEMANDS = (
    Demand(count=1),
    Demand(count=1, models=("RTX 4090",)),
    Demand(count=8, models=("H100",), min_cuda_version=12004),
    Demand(count=2, models=("A100 80GB", "H100"), max_price_per_hour=1.5),
    Demand(count=4, min_vram_mb=40960, region="eu-west", labels=(("nvlink", "yes"),)),
    Demand(count=1, min_compute_capability=8009, cpus=8, memory_mb=32768),
    Demand(count=2, labels=(("tier", "gold"),), region="us-east", max_price_per_hour=0.5),
    Demand(count=1, avoid=frozenset({"p0000001", "p0000002"})),
    # Nothing matches these.
    Demand(count=1, models=("B300",)),
    Demand(count=16),
    Demand(count=1, region="mars"),
    Demand(count=1, max_price_per_hour=0.001),
    Demand(count=2, models=("T4",), min_vram_mb=81920),
    Demand(count=1, labels=(("tier", "platinum"),)),
)


def decision_timings(machines: int, samples: int = 200, seed: int = 0) -> dict[str, float]:
    """Milliseconds per `choose` (p50, p99, max) and per `why_unplaceable` on a synthetic
    fleet of `machines`, over demands of every shape, some that match nothing."""
    index = synthetic_fleet(machines, seed)
    choose: list[float] = []
    why: list[float] = []
    for i in range(samples):
        demand = _BENCH_DEMANDS[i % len(_BENCH_DEMANDS)]
        start = time.perf_counter()
        index.choose(demand)
        choose.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        index.why_unplaceable(demand)
        why.append((time.perf_counter() - start) * 1000)

    def pct(values: list[float], q: float) -> float:
        return round(float(np.percentile(values, q)), 3)

    return {
        "machines": float(machines),
        "pools": float(index._high - len(index._free_rows)),
        "p50_ms": pct(choose, 50),
        "p99_ms": pct(choose, 99),
        "max_ms": round(max(choose), 3),
        "why_p50_ms": pct(why, 50),
        "why_p99_ms": pct(why, 99),
        "why_max_ms": round(max(why), 3),
    }
