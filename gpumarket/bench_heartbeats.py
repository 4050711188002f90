"""`gpumarket bench heartbeats`: how many daemons one provider_registry keeps up with.

Runs a fresh NATS and PostgreSQL in a temp dir, the real provider_registry service, and
N simulated daemons: one real NATS connection each (as on N machines), multiplexed over a
few worker processes, each publishing a Heartbeat every S seconds the way
provider_daemon's heartbeat loop does. The figures come from the registry's own
/metrics and from /proc, over a window that starts only once every daemon is beating.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import mmap
import os
import random
import resource
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.event_loop import run_on_uvloop
from gpumarket.localstack.nats import NatsServer, start_nats
from gpumarket.localstack.postgres import PostgresServer, start_postgres
from gpumarket.localstack.process import free_port, log_tail, spawn, stop_process, wait_until
from gpumarket.platform import service_argv

HEARTBEATS_OK = "registry_heartbeats_total"
LAG = "registry_heartbeat_ingest_lag_seconds"
# Reported when the registry has it (how long one batch takes to commit).
FLUSH = "registry_heartbeat_flush_seconds"
CONNECTIONS_PER_PROCESS = 2_500
# Connections a worker opens at once: enough to ramp fast, few enough that the NATS
# server's accept backlog and the handshake timeouts are never the limit.
CONNECTS_IN_FLIGHT = 100
# Per-worker counters in shared memory, one writer each (no lock needed).
CONNECTED, BEATING, SENT, ERRORS = range(4)
N_COUNTERS = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (model, weight, $/h per GPU): a marketplace fleet is mostly consumer cards.
MODELS = [("RTX 4090", 35, "0.45"), ("RTX 3090", 20, "0.25"), ("A100", 15, "1.30"),
          ("H100", 10, "2.50"), ("L4", 10, "0.40"), ("T4", 10, "0.20")]  # fmt: skip
GPU_COUNTS = [(1, 40), (2, 25), (4, 20), (8, 15)]


# --- the fleet -------------------------------------------------------------------------


@dataclass(frozen=True)
class SimProvider:
    id: str
    machine_id: str
    # A provider-daemon --simulate spec, e.g. "H100:8", so GPU UUIDs and metrics are the
    # daemon's own.
    simulate: str


def make_fleet(count: int, rng: random.Random) -> list[SimProvider]:
    models = [m for m, _, _ in MODELS]
    model_weights = [w for _, w, _ in MODELS]
    counts = [c for c, _ in GPU_COUNTS]
    count_weights = [w for _, w in GPU_COUNTS]
    fleet = []
    for _ in range(count):
        model = rng.choices(models, model_weights)[0]
        gpus = rng.choices(counts, count_weights)[0]
        provider_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        machine_id = uuid.UUID(int=rng.getrandbits(128), version=4)
        fleet.append(SimProvider(str(provider_id), machine_id.hex, f"{model}:{gpus}"))
    return fleet


def fleet_rows(
    fleet: list[SimProvider], rng: random.Random
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for the providers and gpus tables, as a join would have written them."""
    from provider_daemon.gpus import SimulatedGpus

    prices = {m: Decimal(p) for m, _, p in MODELS}
    owners = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in fleet[::10]]
    now = datetime.now(UTC)
    providers, gpus = [], []
    for n, p in enumerate(fleet):
        providers.append(
            {
                "id": p.id,
                "owner_id": rng.choice(owners),
                "machine_id": p.machine_id,
                "name": f"bench-{n:05d}",
                "state": "online",
                "simulated": True,
                "last_heartbeat_at": now,
            }
        )
        for gpu in SimulatedGpus(p.simulate, p.machine_id).inventory().gpus:
            gpus.append(
                {
                    "provider_id": p.id,
                    "uuid": gpu.uuid,
                    "index": gpu.index,
                    "model": gpu.model,
                    "vram_mb": gpu.vram_mb,
                    "price_per_hour": prices[gpu.model],
                    "simulated": True,
                }
            )
    return providers, gpus


async def insert_fleet(database_url: str, fleet: list[SimProvider]) -> int:
    """Bulk-inserts the fleet (SQLAlchemy core, so model defaults apply); returns GPUs."""
    from sqlalchemy import insert
    from sqlalchemy.ext.asyncio import create_async_engine

    from provider_registry.models import Gpu, Provider

    providers, gpus = fleet_rows(fleet, random.Random(len(fleet)))
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            for start in range(0, len(providers), 5_000):
                await conn.execute(insert(Provider.__table__), providers[start : start + 5_000])
            for start in range(0, len(gpus), 5_000):
                await conn.execute(insert(Gpu.__table__), gpus[start : start + 5_000])
    finally:
        await engine.dispose()
    return len(gpus)


# --- worker processes: the simulated daemons -------------------------------------------


def raise_nofile(need: int) -> int:
    """Raises the soft fd limit towards the hard one; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return sys.maxsize if soft == resource.RLIM_INFINITY else soft


def worker_main(argv: list[str] | None = None) -> None:
    """A worker process: python -m gpumarket.bench_heartbeats --slot N ... (see start_workers).

    A plain subprocess rather than multiprocessing, so it works whatever the caller's
    __main__ is; localstack's spawn gives it PR_SET_PDEATHSIG and its own session.
    """
    parser = argparse.ArgumentParser(prog="gpumarket.bench_heartbeats")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--counters", type=Path, required=True)
    parser.add_argument("--interval", type=float, required=True)
    args = parser.parse_args(argv)
    providers = [SimProvider(*row) for row in json.loads(args.fleet.read_text())]
    need = len(providers) + 64
    if raise_nofile(need) < need:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        sys.exit(f"worker {args.slot}: fd limit {soft} (hard {hard}) < {need}: more --processes")
    with Counters.open(args.counters) as counters:
        base = args.slot * N_COUNTERS
        # A load generator's own CPU is CPU the platform under test does not get.
        run_on_uvloop(_run_worker(args.nats_url, providers, args.interval, counters.slots, base))


async def _run_worker(
    nats_url: str, providers: list[SimProvider], interval: float, counters: Any, base: int
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
    clients: list[Any] = []
    tasks = [
        asyncio.create_task(_daemon(p, nats_url, interval, gate, clients, counters, base))
        for p in providers
    ]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.gather(*(nc.close() for nc in clients), return_exceptions=True)


async def _daemon(
    p: SimProvider,
    nats_url: str,
    interval: float,
    gate: asyncio.Semaphore,
    clients: list[Any],
    counters: Any,
    base: int,
) -> None:
    """One simulated provider daemon: its own connection and heartbeat loop."""
    import nats

    from common.messages import Heartbeat
    from common.subjects import heartbeat_subject
    from provider_daemon.gpus import SimulatedGpus

    async def on_error(_: Exception) -> None:
        counters[base + ERRORS] += 1

    gpus = SimulatedGpus(p.simulate, p.machine_id)
    async with gate:
        # The options a real daemon connects with (provider_daemon.daemon._connect).
        nc = await nats.connect(
            nats_url,
            name=f"provider-daemon {p.id}",
            max_reconnect_attempts=-1,
            connect_timeout=10,
            error_cb=on_error,
        )
    clients.append(nc)
    counters[base + CONNECTED] += 1
    subject = heartbeat_subject(p.id)
    # Random phase: daemons of a real fleet were not all started in the same second.
    await asyncio.sleep(random.uniform(0, interval))
    first = True
    while True:
        try:
            # No jobs run in this benchmark: every GPU reports idle metrics.
            beat = Heartbeat(provider_id=p.id, at=datetime.now(UTC), gpus=gpus.metrics(set()))
            await nc.publish(subject, beat.model_dump_json().encode())
            counters[base + SENT] += 1
            if first:
                counters[base + BEATING] += 1
                first = False
        except Exception:
            counters[base + ERRORS] += 1
        # The daemon's jitter: +-10% so a fleet started together drifts apart.
        await asyncio.sleep(interval * random.uniform(0.9, 1.1))


@dataclass
class Counters:
    """int64 counters in a shared file mapping: each worker writes only its own slots."""

    file: Any
    map: mmap.mmap
    slots: memoryview

    @classmethod
    def create(cls, path: Path, workers: int) -> Counters:
        path.write_bytes(bytes(8 * N_COUNTERS * workers))
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> Counters:
        file = path.open("r+b")
        mapped = mmap.mmap(file.fileno(), 0)
        return cls(file, mapped, memoryview(mapped).cast("q"))

    def __enter__(self) -> Counters:
        return self

    def __exit__(self, *_: object) -> None:
        self.slots.release()
        self.map.close()
        self.file.close()


@dataclass
class Workers:
    processes: list[Popen]
    counters: Counters

    def total(self, index: int) -> int:
        slots = self.counters.slots
        return sum(slots[i * N_COUNTERS + index] for i in range(len(self.processes)))

    def check_alive(self) -> None:
        for n, proc in enumerate(self.processes):
            if proc.poll() is not None:
                tail = log_tail(proc.log_path)  # type: ignore[attr-defined]
                raise RuntimeError(f"worker {n} exited with code {proc.returncode}:\n{tail}")

    def shutdown(self) -> None:
        for proc in self.processes:  # all at once: each closes its connections meanwhile
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            stop_process(proc, timeout=15)
        self.counters.__exit__()


def start_workers(
    nats_url: str, fleet: list[SimProvider], interval: float, count: int, tmp: Path
) -> Workers:
    workers = Workers([], Counters.create(tmp / "counters", count))
    for slot in range(count):
        share = tmp / f"fleet-{slot}.json"
        share.write_text(json.dumps([astuple(p) for p in fleet[slot::count]]))
        argv = [sys.executable, "-m", "gpumarket.bench_heartbeats", "--slot", str(slot),
                "--nats-url", nats_url, "--fleet", str(share),
                "--counters", str(tmp / "counters"), "--interval", str(interval)]  # fmt: skip
        proc = spawn(f"worker {slot}", argv, tmp / "logs" / f"worker-{slot}.log")
        workers.processes.append(proc)
    return workers


# --- measuring -------------------------------------------------------------------------


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) buckets.

    Linear interpolation inside the bucket that holds the rank; a rank in the +Inf
    bucket gives the highest finite bound. None when the histogram is empty.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} not in [0, 1]")
    buckets = sorted(buckets)
    if not buckets or not math.isinf(buckets[-1][0]) or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for n, (upper, count) in enumerate(buckets):
        if count >= rank:
            if math.isinf(upper):
                return buckets[n - 1][0] if n > 0 else None
            if n == 0 and upper <= 0:
                return upper
            if count == below:
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return None  # unreachable: the +Inf bucket holds every observation


@dataclass
class Histogram:
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative
    sum: float = 0.0
    count: float = 0.0


@dataclass
class Scrape:
    heartbeats_ok: float
    histograms: dict[str, Histogram]

    @property
    def lag_buckets(self) -> dict[float, float]:
        return self.histograms.get(LAG, Histogram()).buckets


def parse_metrics(text: str) -> Scrape:
    ok, histograms = 0.0, {}
    for family in text_string_to_metric_families(text):
        if family.type == "histogram":
            h = histograms[family.name] = Histogram()
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    h.buckets[float(sample.labels["le"])] = sample.value
                elif sample.name.endswith("_sum"):
                    h.sum = sample.value
                elif sample.name.endswith("_count"):
                    h.count = sample.value
        for sample in family.samples:
            if sample.name == HEARTBEATS_OK and sample.labels.get("result") == "ok":
                ok = sample.value
    return Scrape(ok, histograms)


def bucket_deltas(
    before: dict[float, float], after: dict[float, float]
) -> list[tuple[float, float]]:
    return sorted((le, count - before.get(le, 0.0)) for le, count in after.items())


def proc_stats() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime+stime+cutime+cstime in clock ticks) for every process."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                text = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
        # After the name: state, ppid, ..., utime (14th field of stat), stime, cutime, cstime.
        stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return stats


def tree_ticks(roots: list[int], stats: dict[int, tuple[int, int]]) -> int:
    """CPU ticks of these processes and their descendants (reaped children included)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, list(roots)
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo.extend(children.get(pid, []))
    return total


def machine_ticks() -> int:
    """Busy ticks of all CPUs (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    return cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6] + cpu[7]


def runqueue_wait_ns(pid: int) -> int:
    """Nanoseconds the process' threads spent runnable but waiting for a CPU (schedstat).

    High while the registry is below 100% CPU means it was starved by the machine, not
    limited by its own code.
    """
    total = 0
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"{task.path}/schedstat") as f:
                    total += int(f.read().split()[1])
    return total


@dataclass
class Snapshot:
    at: float
    scrape: Scrape
    sent: int
    ticks: dict[str, int]
    registry_wait_ns: int


def scrape_metrics(metrics_url: str) -> Scrape:
    """Only the series we read: the registry also exports every GPU of the fleet, and
    rendering all of it blocks its event loop for seconds at 10,000 providers."""
    names = [HEARTBEATS_OK] + [f"{h}_{s}" for h in (LAG, FLUSH) for s in ("bucket", "sum", "count")]
    response = httpx.get(metrics_url, params={"name[]": names}, timeout=30)
    response.raise_for_status()
    return parse_metrics(response.text)


def time_full_scrape(metrics_url: str) -> tuple[float, float]:
    """Seconds and MB of one unfiltered scrape, as Prometheus would do it."""
    started = time.monotonic()
    response = httpx.get(metrics_url, timeout=120)
    response.raise_for_status()
    return time.monotonic() - started, len(response.content) / 1e6


def take_snapshot(
    metrics_url: str, groups: dict[str, list[int]], workers: Workers, registry_pid: int
) -> Snapshot:
    scrape = scrape_metrics(metrics_url)
    stats = proc_stats()
    ticks = {name: tree_ticks(pids, stats) for name, pids in groups.items()}
    ticks["machine"] = machine_ticks()
    wait = runqueue_wait_ns(registry_pid)
    return Snapshot(time.monotonic(), scrape, workers.total(SENT), ticks, wait)


def figures(a: Snapshot, b: Snapshot) -> dict[str, float | None]:
    seconds = b.at - a.at

    def cpu(name: str) -> float:
        return round((b.ticks[name] - a.ticks[name]) / CLK_TCK / seconds * 100, 1)

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    def quantile(q: float, name: str) -> float | None:
        before, after = a.scrape.histograms.get(name), b.scrape.histograms.get(name)
        if before is None or after is None:
            return None
        return rounded(histogram_quantile(q, bucket_deltas(before.buckets, after.buckets)))

    def mean(name: str) -> float | None:
        # Unlike a quantile, not capped at the highest bucket: shows how far past it.
        before, after = a.scrape.histograms.get(name), b.scrape.histograms.get(name)
        if before is None or after is None or after.count <= before.count:
            return None
        return rounded((after.sum - before.sum) / (after.count - before.count))

    return {
        "heartbeats_sent_per_s": round((b.sent - a.sent) / seconds, 1),
        "heartbeats_per_s": round((b.scrape.heartbeats_ok - a.scrape.heartbeats_ok) / seconds, 1),
        "ingest_lag_p50_s": quantile(0.5, LAG),
        "ingest_lag_p99_s": quantile(0.99, LAG),
        "ingest_lag_mean_s": mean(LAG),
        "flush_p50_s": quantile(0.5, FLUSH),
        "flush_p99_s": quantile(0.99, FLUSH),
        "registry_cpu_pct": cpu("registry"),
        "registry_runqueue_wait_pct": round(
            (b.registry_wait_ns - a.registry_wait_ns) / 1e9 / seconds * 100, 1
        ),
        "postgres_cpu_pct": cpu("postgres"),
        "nats_cpu_pct": cpu("nats"),
        "workers_cpu_pct": cpu("workers"),
        "machine_cpu_pct": cpu("machine"),
        # Whatever else ran on the machine meanwhile (e.g. someone's tests): noise.
        "other_cpu_pct": round(
            cpu("machine") - sum(cpu(n) for n in ("registry", "postgres", "nats", "workers")), 1
        ),
    }


# --- the stack -------------------------------------------------------------------------


@dataclass
class Stack:
    """What the benchmark started, stopped in reverse order."""

    nats: NatsServer | None = None
    postgres: PostgresServer | None = None
    registry: Popen | None = None
    registry_port: int = 0
    workers: Workers | None = None
    _stops: list[Callable[[], None]] = field(default_factory=list)

    @property
    def registry_url(self) -> str:
        return f"http://127.0.0.1:{self.registry_port}"

    def stop(self) -> None:
        while self._stops:
            with contextlib.suppress(Exception):
                self._stops.pop()()


def start_registry(stack: Stack, log_dir: Path) -> None:
    assert stack.nats is not None and stack.postgres is not None
    stack.registry_port = free_port()
    env = {
        **os.environ,
        # What LocalPlatform.service_env gives the registry.
        "GPUMARKET_DEV_MODE": "true",
        "GPUMARKET_DATABASE_URL": stack.postgres.url,
        "GPUMARKET_NATS_URL": stack.nats.url,
        "GPUMARKET_INTERNAL_TOKEN": secrets.token_urlsafe(32),
    }
    argv = service_argv("provider_registry", stack.registry_port)
    proc = spawn("provider_registry", argv, log_dir / "provider_registry.log", env=env)
    stack.registry = proc
    stack._stops.append(lambda: stop_process(proc, timeout=20))
    health = f"{stack.registry_url}/healthz"
    wait_until(lambda: httpx.get(health, timeout=2).status_code == 200, 60, "registry", proc)


def start_stack(stack: Stack, tmp: Path, fleet: list[SimProvider], console: Console) -> int:
    """NATS, Postgres (migrated, fleet inserted) and the registry; returns the GPU count."""
    from migrations.runner import upgrade

    with console.status("starting NATS and PostgreSQL") as status:
        stack.nats = start_nats(tmp / "nats")
        stack._stops.append(stack.nats.stop)
        stack.postgres = start_postgres(tmp / "postgres")
        stack._stops.append(stack.postgres.stop)
        status.update("migrating the database")
        upgrade(stack.postgres.url)
        status.update(f"inserting {len(fleet)} providers")
        gpus = asyncio.run(insert_fleet(stack.postgres.url, fleet))
        status.update("starting provider_registry")
        start_registry(stack, tmp / "logs")
    return gpus


def check_fd_limits(providers: int, processes: int) -> None:
    """Fails early, and clearly, when the fd limits cannot hold every connection."""
    # NATS (a child) inherits our soft limit and holds one fd per daemon.
    need_nats = providers + 256
    need_worker = math.ceil(providers / processes) + 64
    have = raise_nofile(max(need_nats, need_worker))
    if have < need_nats:
        raise RuntimeError(
            f"fd limit {have} < {need_nats} that nats-server needs for {providers} "
            "connections: raise the hard limit (ulimit -Hn) or use fewer --providers"
        )
    if have < need_worker:
        raise RuntimeError(f"fd limit {have} < {need_worker} per worker: use more --processes")


def default_processes(providers: int) -> int:
    return max(1, min(16, math.ceil(providers / CONNECTIONS_PER_PROCESS)))


# --- the run ---------------------------------------------------------------------------


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:>.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def ramp_up(stack: Stack, workers: Workers, providers: int, console: Console) -> float:
    """Waits until every daemon is connected and has sent a heartbeat; returns seconds."""
    started = time.monotonic()
    # Generous: 10,000 handshakes on 2 cores take a while; a stall means something broke.
    deadline = started + 120 + providers / 50
    with progress_bar(console) as progress:
        connecting = progress.add_task("NATS connections", total=providers)
        beating = progress.add_task("first heartbeats", total=providers)
        while True:
            workers.check_alive()
            _check_running(stack)
            connected, beats = workers.total(CONNECTED), workers.total(BEATING)
            progress.update(connecting, completed=connected)
            progress.update(beating, completed=beats)
            if beats >= providers:
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"ramp-up stalled: {connected}/{providers} connected, {beats} beating, "
                    f"{workers.total(ERRORS)} errors"
                )
            time.sleep(0.25)


def _check_running(stack: Stack) -> None:
    if stack.registry is not None and stack.registry.poll() is not None:
        raise RuntimeError(f"provider_registry exited with code {stack.registry.returncode}")


def wait_withprogress_bar(
    stack: Stack, workers: Workers, what: str, seconds: float, console: Console
) -> None:
    with progress_bar(console) as progress:
        task = progress.add_task(what, total=seconds)
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            workers.check_alive()
            _check_running(stack)
            time.sleep(min(0.25, left))
            progress.update(task, completed=seconds - max(0.0, end - time.monotonic()))


def catch_up(workers: Workers, metrics_url: str, console: Console, timeout: float) -> bool:
    """Waits until the registry has received what the daemons sent (within 1%).

    A registry still working off the ramp's backlog would count old heartbeats as this
    window's; False when it never catches up (then that is the finding).
    """
    deadline = time.monotonic() + timeout
    with console.status("waiting for the registry to catch up") as status:
        while True:
            workers.check_alive()
            sent = workers.total(SENT)
            received = scrape_metrics(metrics_url).heartbeats_ok
            if received >= 0.99 * sent:
                return True
            if time.monotonic() > deadline:
                return False
            status.update(f"the registry is {sent - received:.0f} heartbeats behind")
            time.sleep(0.5)


def registry_log_errors(log_path: Path, console: Console) -> int:
    """Errors the registry logged (JSON lines); the last one is shown, as a lead."""
    errors = []
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("level") in ("error", "critical"):
                    errors.append(record)
    if errors:
        last = errors[-1]
        exc = (last.get("exc") or "").strip().splitlines()
        console.print(
            f"[yellow]provider_registry logged {len(errors)} error(s); last:[/] "
            f"{last.get('msg')} {exc[-1][:300] if exc else ''}",
            soft_wrap=True,
        )
    return len(errors)


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"{result['providers']} simulated daemons, a heartbeat every "
        f"{result['interval_s']} s, measured over {result['duration_s']} s"
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, "-" if value is None else str(value))
    console.print(table)


def run_heartbeats_bench(
    providers: int,
    interval: float,
    duration: float,
    processes: int | None,
    console: Console,
) -> dict[str, Any]:
    """Runs the benchmark; prints a table, then the figures as JSON on the last line."""
    processes = min(providers, processes or default_processes(providers))
    check_fd_limits(providers, processes)
    fleet = make_fleet(providers, random.Random(providers))
    stack = Stack()
    wall_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-hb-") as tmp:
        try:
            gpus = start_stack(stack, Path(tmp), fleet, console)
            assert stack.nats and stack.postgres and stack.registry
            stack.workers = workers = start_workers(
                stack.nats.url, fleet, interval, processes, Path(tmp)
            )
            stack._stops.append(workers.shutdown)
            ramp_s = ramp_up(stack, workers, providers, console)
            # One more interval, so the registry works at its steady pace, not the ramp's.
            wait_withprogress_bar(stack, workers, "warm-up", interval, console)
            groups = {
                "registry": [stack.registry.pid],
                "postgres": [stack.postgres.proc.pid],
                "nats": [stack.nats.proc.pid],
                "workers": [p.pid for p in workers.processes if p.pid is not None],
            }
            # /metrics is a mounted app: /metrics redirects here.
            metrics_url = f"{stack.registry_url}/metrics/"
            caught_up = catch_up(workers, metrics_url, console, timeout=60)
            before = take_snapshot(metrics_url, groups, workers, stack.registry.pid)
            wait_withprogress_bar(stack, workers, "measuring", duration, console)
            after = take_snapshot(metrics_url, groups, workers, stack.registry.pid)
            errors = workers.total(ERRORS)
            # After the window, not in it: it stalls the registry.
            scrape_s, scrape_mb = time_full_scrape(metrics_url)
            log_errors = registry_log_errors(Path(tmp) / "logs" / "provider_registry.log", console)
        finally:
            with console.status("stopping"):
                stack.stop()
    result: dict[str, Any] = {
        "providers": providers,
        "gpus": gpus,
        "interval_s": interval,
        "duration_s": duration,
        **figures(before, after),
        "processes": processes,
        "ramp_up_s": round(ramp_s, 1),
        "caught_up_before_window": caught_up,
        "daemon_errors": errors,
        "registry_log_errors": log_errors,
        "full_metrics_scrape_s": round(scrape_s, 2),
        "full_metrics_scrape_mb": round(scrape_mb, 1),
        "wall_s": round(time.monotonic() - wall_start, 1),
    }
    print_table(result, console)
    print(json.dumps(result), flush=True)
    return result


# The keys every run's JSON line holds (more may follow).
RESULT_KEYS = ("providers", "interval_s", "duration_s", "heartbeats_sent_per_s",
               "heartbeats_per_s", "ingest_lag_p50_s", "ingest_lag_p99_s",
               "registry_cpu_pct", "postgres_cpu_pct", "nats_cpu_pct", "processes")  # fmt: skip


if __name__ == "__main__":
    worker_main()
