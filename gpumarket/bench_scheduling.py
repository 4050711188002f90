"""`gpumarket bench scheduling`: how fast jobs go from submitted to assigned.

Starts a fresh platform in a temp dir (NATS, PostgreSQL, the S3 server, auth_service,
storage_service, provider_registry, the gateway and K scheduler replicas, all sharing the
same durable JetStream consumers), inserts N simulated providers, submits M jobs, and
measures until every job is assigned. No container runs anywhere.

What is real and what is simulated:
- The providers are rows in `providers` and `gpus` (1, 2, 4 or 8 GPUs of mixed models
  and prices, flagged `simulated`), bulk-inserted as a join would have written them
  (`bench_heartbeats.insert_fleet`); the schedulers run in dev mode and with
  GPUMARKET_ALLOW_SIMULATED=true, so they may place jobs on them.
- The real provider_registry runs, and the simulated daemons send every provider's
  heartbeat every 5 s (the interval the gateway hands real daemons), so the providers
  stay online the honest way, and the heartbeat batches' row updates compete with the
  schedulers' reservations in Postgres as they do in production.
- The simulated daemons are a few worker processes (one NATS connection each) that share
  one durable pull consumer on `tasks.>` (TASKS is a work queue, so each task goes to one
  of them), not one durable consumer per provider as real daemons hold: same messages,
  same stream, far fewer consumers on the NATS server. Each TaskAssignment is answered at
  once with `accepted` (then the task is acked, as the daemon does), `started` and
  `finished` (outcome "exited", exit code 0) on `events.<provider_id>.<job_id>`, with the
  daemon's Nats-Msg-Id, so GPUs free up again and M may exceed the number of GPUs.
- `--via gateway` (default): one requester registered through the gateway; M jobs POSTed
  to /v1/jobs over many concurrent HTTP connections, one job per request, or with
  `--batch B`, B jobs per POST /v1/jobs/batch. The gateway's per-principal rate limit is
  raised through its setting for this platform only.
- `--via jetstream`: the gateway's path minus HTTP: jobs inserted through
  `scheduler.job_store.new_job`, a few thousand per transaction, and one `jobs.submitted`
  wake-up published per job.

Figures: jobs/s from the first submit to the last assignment; submit -> assigned latency
per job from the jobs' own `created_at` and `assigned_at` (one machine, one clock; a job
placed twice, e.g. taken back when its `accepted` came late, counts its last assignment,
and `retried` says how many were); the raw JetStream publish -> consume rate on the same
NATS server, to compare with, with its CPU per message, the messages each job sent
through JetStream, and from those the jobs/s that moving the messages alone would allow
on this machine's cores (`transport_bound_jobs_per_s`); the time of one in-memory
placement decision over 1,000 to 100,000 machines (`scheduler.fleet_index.decision_timings`);
CPU seconds per process kind over the placement window, from /proc (`other` is whatever
else ran on the machine); and, to tell where time went, the schedulers' largest JOBS and
EVENTS consumer backlogs and how long the daemons took from a task's publish to their
`accepted`. The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import enum
import json
import math
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import astuple, dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import httpx
from pydantic import Field, TypeAdapter, ValidationError
from rich.console import Console
from rich.table import Table

from common.aio import wait_event
from common.event_loop import run_on_uvloop
from common.subjects import EVENTS_STREAM, JOBS_STREAM, TASKS_STREAM
from gpumarket.bench_heartbeats import (
    CLK_TCK,
    Counters,
    SimProvider,
    Workers,
    insert_fleet,
    machine_ticks,
    make_fleet,
    proc_stats,
    progress_bar,
    raise_nofile,
    tree_ticks,
)
from gpumarket.client import Client
from gpumarket.localstack.nats import start_nats
from gpumarket.localstack.postgres import start_postgres
from gpumarket.localstack.process import free_port, log_tail, spawn
from gpumarket.localstack.s3 import start_s3
from gpumarket.platform import LocalPlatform, Servers

SPEC: dict[str, Any] = {
    "image": "bench",
    "command": ["true"],
    "resources": {"gpus": 1},
    "max_duration_s": 60,
}
# The one durable consumer on tasks.> that every simulated-daemon process pulls from.
DAEMONS_DURABLE = "bench-daemons"
# The scratch stream of the raw JetStream measurement: JOBS' settings, its own subjects.
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "benchraw.submitted"
# At least this many raw messages, whatever --jobs: the NATS server's CPU is read in clock
# ticks (10 ms), a few hundred messages' worth.
RAW_MIN_MESSAGES = 10_000
# What the gateway hands real daemons at join (GatewaySettings.heartbeat_interval_s).
HEARTBEAT_INTERVAL_S = 5.0
# Async publishes in flight at once (wake-ups of --via jetstream, the raw measurement).
PUBLISHES_IN_FLIGHT = 1_000
# Jobs per transaction with --via jetstream.
INSERT_CHUNK = 2_000
# Credits for every hold a run places (1,000,000 jobs x 1 GPU x 5.00/h x 60 s < this).
BENCH_CREDITS = Decimal(100_000_000)
# As the scheduler's own consumer fetches (scheduler.worker.consume).
FETCH_BATCH = 64
DECISION_MACHINES = (1_000, 10_000, 100_000)
# Per-worker counters (bench_heartbeats.Counters: four int64 slots per worker).
READY, TASKS, HEARTBEATS, ERRORS = range(4)


class Via(enum.StrEnum):
    gateway = "gateway"
    jetstream = "jetstream"


class BenchError(RuntimeError):
    """The benchmark could not produce its figures (a job lost, a process died, ...)."""


# --- the simulated daemons: worker processes --------------------------------------------


def _task_adapter() -> TypeAdapter[Any]:
    from common.messages import TaskAssignment, TaskCancel

    return TypeAdapter(Annotated[TaskAssignment | TaskCancel, Field(discriminator="kind")])


def worker_main(argv: list[str] | None = None) -> None:
    """A worker process: python -m gpumarket.bench_scheduling --slot N ... (see start_daemons)."""
    parser = argparse.ArgumentParser(prog="gpumarket.bench_scheduling")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--fleet", type=Path, required=True)
    parser.add_argument("--counters", type=Path, required=True)
    parser.add_argument("--interval", type=float, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args(argv)
    providers = [SimProvider(*row) for row in json.loads(args.fleet.read_text())]
    with Counters.open(args.counters) as counters:
        daemons = SimulatedDaemons(counters.slots, args.slot * 4)
        run_on_uvloop(daemons.run(args.nats_url, providers, args.interval))
    args.stats.write_text(
        json.dumps({"accept_ms": daemons.accept_ms, "redelivered": daemons.redelivered})
    )


@dataclass
class SimulatedDaemons:
    """One worker process' share of the daemons: heartbeats for its providers, and the
    tasks it pulls from the shared consumer, answered at once."""

    counters: Any
    base: int
    # Per task: from its publish by the scheduler (its JetStream timestamp) to the ack
    # of our `accepted` event. Long means the daemons or NATS are the bottleneck.
    accept_ms: list[float] = field(default_factory=list)
    redelivered: int = 0

    def count(self, index: int) -> None:
        self.counters[self.base + index] += 1

    async def run(self, nats_url: str, providers: list[SimProvider], interval: float) -> None:
        import nats
        from nats.errors import TimeoutError as NatsTimeoutError

        from common import subjects

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        async def on_error(_: Exception) -> None:
            self.count(ERRORS)

        nc = await nats.connect(
            nats_url, name="bench simulated daemons", max_reconnect_attempts=-1, error_cb=on_error
        )
        js = nc.jetstream()
        adapter = _task_adapter()
        sub = await js.pull_subscribe_bind(durable=DAEMONS_DURABLE, stream=subjects.TASKS_STREAM)
        beating = asyncio.create_task(self.heartbeats(nc, providers, interval))
        self.count(READY)
        running: set[asyncio.Task] = set()
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch=256, timeout=1)
            except (NatsTimeoutError, TimeoutError):
                continue
            except Exception:
                self.count(ERRORS)
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                task = asyncio.create_task(self.answer(js, msg, adapter))
                running.add(task)
                task.add_done_callback(running.discard)
        beating.cancel()
        await asyncio.gather(beating, *running, return_exceptions=True)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10):
                await nc.close()

    async def answer(self, js: Any, msg: Any, adapter: TypeAdapter[Any]) -> None:
        """What the daemon does with a task, minus the container: accepted, started,
        finished."""
        from common.messages import TaskCancel

        provider_id = msg.subject.split(".", 1)[1]
        try:
            task = adapter.validate_json(msg.data)
        except ValidationError:
            self.count(ERRORS)
            await msg.term()
            return
        if isinstance(task, TaskCancel):
            await msg.ack()
            return
        if msg.metadata.num_delivered > 1:
            self.redelivered += 1
        if not await self.event(js, provider_id, task, "accepted"):
            await msg.nak(delay=1)
            return
        await msg.ack()
        self.accept_ms.append((time.time() - msg.metadata.timestamp.timestamp()) * 1000)
        await self.event(js, provider_id, task, "started")
        await self.event(js, provider_id, task, "finished", exit_code=0, outcome="exited")
        self.count(TASKS)

    async def event(self, js: Any, provider_id: str, task: Any, type_: str, **fields: Any) -> bool:
        """Publishes one JobEvent as provider_daemon.publisher does (acked, de-duplicated)."""
        from common.messages import JobEvent
        from common.subjects import event_subject, msg_id

        event = JobEvent(
            job_id=task.job_id,
            attempt=task.attempt,
            provider_id=provider_id,
            type=type_,  # type: ignore[arg-type]
            at=datetime.now(UTC),
            **fields,
        )
        payload = event.model_dump_json().encode()
        headers = {"Nats-Msg-Id": msg_id(task.job_id, task.attempt, type_)}
        for attempt in range(5):
            try:
                await js.publish(
                    event_subject(provider_id, task.job_id), payload, timeout=5, headers=headers
                )
                return True
            except Exception:
                self.count(ERRORS)
                await asyncio.sleep(0.2 * 2**attempt)
        return False

    async def heartbeats(self, nc: Any, providers: list[SimProvider], interval: float) -> None:
        """Every provider's heartbeat once per interval, spread evenly over it."""
        from common.messages import Heartbeat
        from common.subjects import heartbeat_subject
        from provider_daemon.gpus import SimulatedGpus

        gpus = {p.id: SimulatedGpus(p.simulate, p.machine_id) for p in providers}
        ticks = max(1, round(interval / 0.25))
        buckets = [providers[n::ticks] for n in range(ticks)]
        loop = asyncio.get_running_loop()
        tick = 0
        while True:
            started = loop.time()
            for p in buckets[tick % ticks]:
                # Tasks end the moment they start: every GPU reports idle metrics.
                metrics = gpus[p.id].metrics(set())
                beat = Heartbeat(provider_id=p.id, at=datetime.now(UTC), gpus=metrics)
                try:
                    await nc.publish(heartbeat_subject(p.id), beat.model_dump_json().encode())
                    self.count(HEARTBEATS)
                except Exception:
                    self.count(ERRORS)
            tick += 1
            await asyncio.sleep(max(0.0, started + interval / ticks - loop.time()))


async def create_daemons_consumer(nats_url: str) -> None:
    """The TASKS stream (as the services make it) and the daemons' shared consumer."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    from common import subjects
    from common.streams import ensure_streams

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js)
        await js.add_consumer(
            subjects.TASKS_STREAM,
            ConsumerConfig(
                durable_name=DAEMONS_DURABLE,
                filter_subject="tasks.>",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=30,
                # Every GPU of the fleet may hold a task not yet acked.
                max_ack_pending=-1,
            ),
        )
    finally:
        await nc.close()


def start_daemons(nats_url: str, fleet: list[SimProvider], count: int, tmp: Path) -> Workers:
    workers = Workers([], Counters.create(tmp / "counters", count))
    for slot in range(count):
        share = tmp / f"fleet-{slot}.json"
        share.write_text(json.dumps([astuple(p) for p in fleet[slot::count]]))
        argv = [sys.executable, "-m", "gpumarket.bench_scheduling", "--slot", str(slot),
                "--nats-url", nats_url, "--fleet", str(share), "--counters",
                str(tmp / "counters"), "--interval", str(HEARTBEAT_INTERVAL_S),
                "--stats", str(tmp / f"stats-{slot}.json")]  # fmt: skip
        proc = spawn(f"daemons {slot}", argv, tmp / "logs" / f"daemons-{slot}.log")
        workers.processes.append(proc)
    return workers


def daemon_stats(workers: Workers, tmp: Path) -> dict[str, Any]:
    """Stops the daemons (each writes its stats as it exits) and sums up their stats."""
    workers.shutdown()
    accept_ms: list[float] = []
    redelivered = 0
    for slot in range(len(workers.processes)):
        path = tmp / f"stats-{slot}.json"
        if not path.exists():
            raise BenchError(f"simulated daemons {slot} left no stats (see its log)")
        stats = json.loads(path.read_text())
        accept_ms += stats["accept_ms"]
        redelivered += stats["redelivered"]
    accept_ms.sort()
    return {
        "daemon_accept_ms": {
            "p50": round(percentile(accept_ms, 0.5), 1) if accept_ms else None,
            "p99": round(percentile(accept_ms, 0.99), 1) if accept_ms else None,
            "max": round(accept_ms[-1], 1) if accept_ms else None,
        },
        "tasks_redelivered": redelivered,
    }


def wait_daemons_ready(workers: Workers, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while workers.total(READY) < len(workers.processes):
        workers.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("the simulated daemons did not subscribe to their tasks in time")
        time.sleep(0.1)


# --- the raw JetStream rate ------------------------------------------------------------


@dataclass
class RawRate:
    """The transport alone: messages/s, and the CPU each message cost the NATS server and
    the one process that published, fetched and acked it (microseconds)."""

    per_s: float
    server_us: float
    client_us: float

    def jobs_bound(self, messages_per_job: float, cores: int) -> float:
        """The most jobs/s `cores` could carry doing nothing but move each job's messages
        at this cost: a ceiling no scheduler or database work can raise."""
        return cores * 1e6 / (messages_per_job * (self.server_us + self.client_us))


async def jetstream_raw_rate(nats_url: str, count: int, server_pid: int) -> RawRate:
    """Messages/s through a scratch stream with JOBS' settings, published with up to
    PUBLISHES_IN_FLIGHT async publishes in flight (each with a Nats-Msg-Id, as the
    gateway sends them) and consumed by a pull consumer fetching and acking as the
    scheduler does, from the first publish to the last ack. The payloads are made first:
    this is the transport alone. Every message is published, fetched and acked in this
    process, as each of a job's messages is by the platform's processes."""
    import nats
    from nats.errors import TimeoutError as NatsTimeoutError

    from common import subjects
    from common.messages import JobSubmitted
    from common.streams import STREAMS

    jobs_config = next(c for c in STREAMS if c.name == subjects.JOBS_STREAM)
    config = dataclasses.replace(jobs_config, name=RAW_STREAM, subjects=[RAW_SUBJECT])
    messages = []
    for _ in range(count):
        job_id = str(uuid.uuid4())
        payload = JobSubmitted(job_id=job_id, attempt=0).model_dump_json().encode()
        messages.append((payload, {"Nats-Msg-Id": subjects.msg_id(job_id, 0, "submitted")}))
    publisher = await nats.connect(nats_url, name="bench raw publisher")
    consumer = await nats.connect(nats_url, name="bench raw consumer")
    try:
        js = publisher.jetstream(publish_async_max_pending=PUBLISHES_IN_FLIGHT)
        await js.add_stream(config)
        sub = await consumer.jetstream().pull_subscribe(
            RAW_SUBJECT, durable="bench-raw", stream=RAW_STREAM
        )

        async def consume() -> None:
            received = 0
            while received < count:
                try:
                    msgs = await sub.fetch(batch=FETCH_BATCH, timeout=5)
                except (NatsTimeoutError, TimeoutError) as exc:
                    raise BenchError(f"raw JetStream: {received}/{count} consumed") from exc
                for msg in msgs:
                    await msg.ack()
                received += len(msgs)

        started = time.perf_counter()
        server_ticks, client_s = tree_ticks([server_pid], proc_stats()), time.process_time()
        consuming = asyncio.create_task(consume())
        acks = [
            await js.publish_async(RAW_SUBJECT, payload, headers=headers)
            for payload, headers in messages
        ]
        await js.publish_async_completed()
        failed = [f for f in acks if f.exception() is not None]
        if failed:
            consuming.cancel()
            raise BenchError(
                f"raw JetStream: {len(failed)} publishes failed: {failed[0].exception()}"
            )
        await consuming
        elapsed = time.perf_counter() - started
        client_s = time.process_time() - client_s
        server_s = (tree_ticks([server_pid], proc_stats()) - server_ticks) / CLK_TCK
        await sub.unsubscribe()
        await js.delete_stream(RAW_STREAM)
    finally:
        await publisher.close()
        await consumer.close()
    return RawRate(count / elapsed, server_s * 1e6 / count, client_s * 1e6 / count)


# The streams a job's messages go through: its wake-up, its task, its daemon's events.
JOB_STREAMS = {"jobs": JOBS_STREAM, "tasks": TASKS_STREAM, "events": EVENTS_STREAM}


async def stream_sequences(nats_url: str) -> dict[str, int]:
    """The last sequence number of each of JOB_STREAMS: messages stored since it began."""
    import nats

    nc = await nats.connect(nats_url, name="bench stream counter")
    try:
        js = nc.jetstream()
        return {
            name: (await js.stream_info(stream)).state.last_seq
            for name, stream in JOB_STREAMS.items()
        }
    finally:
        await nc.close()


# --- submitting ------------------------------------------------------------------------


@dataclass
class Submitted:
    jobs: int = 0
    requests: int = 0
    # time.time() when the last submission was answered (or its wake-up published).
    done_at: float | None = None


async def submit_via_jetstream(
    database_url: str, nats_url: str, count: int, submitted: Submitted
) -> None:
    """The gateway's path minus HTTP: insert through job_store.new_job, then wake up."""
    import nats

    from billing.funding import add_credits
    from billing.holds import place_holds
    from billing.settings import BillingSettings
    from common import subjects
    from common.db import make_engine, make_sessionmaker
    from common.messages import JobSubmitted
    from scheduler import job_store, settling
    from scheduler.schemas import JobSpec

    spec = JobSpec.model_validate(SPEC)
    billing = BillingSettings(dev_mode=True)
    owner_id = str(uuid.uuid4())
    engine = make_engine(database_url)
    sessionmaker = make_sessionmaker(engine)
    async with sessionmaker.begin() as session:
        await add_credits(session, owner_id, BENCH_CREDITS, reference=f"bench-{owner_id}")
    nc = await nats.connect(nats_url, name="bench submitter")
    js = nc.jetstream(publish_async_max_pending=PUBLISHES_IN_FLIGHT)
    acks = []
    try:
        for start in range(0, count, INSERT_CHUNK):
            jobs = [
                job_store.new_job(owner_id, spec, billing=billing)
                for _ in range(min(INSERT_CHUNK, count - start))
            ]
            async with sessionmaker.begin() as session:
                session.add_all(jobs)
                await session.flush()
                await place_holds(session, owner_id, settling.holds_of(jobs))
            for job in jobs:
                wake = JobSubmitted(job_id=job.id, attempt=job.attempt).model_dump_json().encode()
                headers = {"Nats-Msg-Id": subjects.msg_id(job.id, job.attempt, "submitted")}
                acks.append(await js.publish_async(subjects.JOB_SUBMITTED, wake, headers=headers))
            submitted.jobs += len(jobs)
            submitted.requests += 1
        await js.publish_async_completed()
        failed = [f for f in acks if f.exception() is not None]
        if failed:
            # The jobs are in Postgres: the scheduler's periodic pass still finds them.
            print(f"{len(failed)} wake-ups failed: {failed[0].exception()}", file=sys.stderr)
        submitted.done_at = time.time()
    finally:
        await nc.close()
        await engine.dispose()


class Pacer:
    """Requests at a steady rate, as many requesters make them (an open loop): the n-th
    goes out at start + n / rate, whenever the ones before it are answered. Without a
    rate, each connection sends its next request as soon as it has its answer (a closed
    loop: the rate is whatever the platform keeps up with)."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.start: float | None = None
        self.sent = 0

    async def turn(self) -> None:
        """Waits for the next request's time."""
        if self.rate is None:
            return
        if self.start is None:
            self.start = self.clock()
        due = self.start + self.sent / self.rate
        self.sent += 1
        if (delay := due - self.clock()) > 0:
            await self.sleep(delay)


async def submit_via_gateway(
    gateway_url: str,
    token: str,
    count: int,
    batch: int,
    concurrency: int,
    submitted: Submitted,
    rate: float | None = None,
) -> None:
    """POST /v1/jobs (or /v1/jobs/batch with batch > 1) from `concurrency` keep-alive
    connections, at `rate` requests a second if given (Pacer).

    A minimal HTTP/1.1 client, as wrk is: the request bytes are built once per size and
    an answer is read by its Content-Length. httpx spent about 2 ms of CPU per request
    here, a fifth of the machine at 200 requests/s, taken from the platform it measures.
    """
    url = httpx.URL(gateway_url)
    path = "/v1/jobs/batch" if batch > 1 else "/v1/jobs"
    sizes = iter([batch] * (count // batch) + ([count % batch] if count % batch else []))
    requests: dict[int, bytes] = {}

    def request(size: int) -> bytes:
        if size not in requests:
            body = json.dumps({"template": SPEC, "count": size} if batch > 1 else SPEC).encode()
            head = (
                f"POST {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            requests[size] = head.encode() + body
        return requests[size]

    pacer = Pacer(rate)

    async def submitter() -> None:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            for size in sizes:
                await pacer.turn()
                writer.write(request(size))
                status, answer = await _read_response(reader)
                if status != 202:
                    raise BenchError(f"{path} answered {status}: {answer[:300]!r}")
                if batch > 1 and json.loads(answer).get("count") != size:
                    raise BenchError(f"asked for {size} jobs, got {json.loads(answer)['count']}")
                submitted.jobs += size
                submitted.requests += 1
        finally:
            writer.close()

    await asyncio.gather(*(submitter() for _ in range(min(concurrency, count))))
    submitted.done_at = time.time()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 answer with a Content-Length, as uvicorn sends."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


# --- measuring -------------------------------------------------------------------------


@dataclass
class CpuSnapshot:
    at: float
    ticks: dict[str, int]
    each: dict[str, int]
    # Every process' (ppid, ticks), to name what else used the machine.
    stats: dict[int, tuple[int, int]]
    ours: set[int]


def _descendants(roots: list[int], stats: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def cpu_snapshot(groups: dict[str, list[int]], each: dict[str, int]) -> CpuSnapshot:
    """CPU ticks per process kind (whole process trees), per scheduler, and the machine's."""
    stats = proc_stats()
    ticks = {name: tree_ticks(pids, stats) for name, pids in groups.items()}
    # The bench process itself (the HTTP clients, the polling), without its children.
    ticks["client"] = stats.get(os.getpid(), (0, 0))[1]
    ticks["machine"] = machine_ticks()
    ours = _descendants([os.getpid()], stats)
    each_ticks = {name: tree_ticks([pid], stats) for name, pid in each.items()}
    return CpuSnapshot(time.monotonic(), ticks, each_ticks, stats, ours)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def cpu_seconds(a: CpuSnapshot, b: CpuSnapshot) -> tuple[dict[str, float], dict[str, float]]:
    kinds = {name: round((b.ticks[name] - a.ticks[name]) / CLK_TCK, 2) for name in a.ticks}
    kinds["other"] = round(kinds["machine"] - sum(v for k, v in kinds.items() if k != "machine"), 2)
    each = {name: round((b.each[name] - a.each[name]) / CLK_TCK, 2) for name in a.each}
    return kinds, each


def other_top(a: CpuSnapshot, b: CpuSnapshot, count: int = 3) -> list[list[Any]]:
    """The processes outside the benchmark that used the most CPU in the window (those
    still alive at its end), as [pid, name, seconds]: who else shared the machine. A
    shell's figure includes the children it reaped meanwhile (someone's test run)."""
    ours = a.ours | b.ours
    used = [
        (ticks - a.stats.get(pid, (0, 0))[1], pid)
        for pid, (_, ticks) in b.stats.items()
        if pid not in ours
    ]
    return [
        [pid, _comm(pid), round(ticks / CLK_TCK, 2)]
        for ticks, pid in sorted(used, reverse=True)[:count]
        if ticks > 0
    ]


def percentile(ordered: list[float], q: float) -> float:
    """Nearest rank on sorted values."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _count(engine: Any, where: str) -> int:
    from sqlalchemy import text

    async with engine.connect() as conn:
        return int(await conn.scalar(text(f"SELECT count(*) FROM jobs WHERE {where}")))


async def _job_times(engine: Any) -> list[tuple[datetime, datetime | None]]:
    from sqlalchemy import text

    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT created_at, assigned_at FROM jobs"))
        return [(r[0], r[1]) for r in rows]


@dataclass
class Run:
    """What one run needs while jobs are being placed."""

    platform: LocalPlatform
    workers: Workers
    console: Console
    jobs: int
    via: Via
    batch: int
    concurrency: int
    timeout: float
    rate: float | None = None
    token: str | None = None
    groups: dict[str, list[int]] = field(default_factory=dict)
    each: dict[str, int] = field(default_factory=dict)

    def check_alive(self) -> None:
        self.workers.check_alive()
        for proc in self.platform.processes:
            if proc.process.poll() is not None:
                tail = log_tail(proc.process.log_path)  # type: ignore[attr-defined]
                raise BenchError(f"{proc.name} exited with code {proc.process.returncode}:\n{tail}")


@dataclass
class Backlog:
    """The most messages the schedulers' durable consumers had not yet handled (pending
    plus delivered but not acked), sampled twice a second: a growing EVENTS backlog
    means the schedulers apply the daemons' events slower than they come."""

    max: dict[str, int] = field(default_factory=lambda: {"jobs": 0, "events": 0})
    # Set to end `watch`, which is not cancelled: on Python 3.11 asyncio.wait_for (inside
    # nats-py's requests) can swallow a cancellation, and the watcher then polled on
    # forever while the bench waited for it (seen once, after every job had run).
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    async def watch(self, nats_url: str) -> None:
        import nats

        from common import subjects

        consumers = {
            "jobs": (subjects.JOBS_STREAM, subjects.SCHEDULER_DURABLE),
            "events": (subjects.EVENTS_STREAM, subjects.SCHEDULER_EVENTS_DURABLE),
        }
        nc = await nats.connect(nats_url, name="bench backlog watcher")
        try:
            js = nc.jetstream()
            while not self.stopped.is_set():
                for name, (stream, durable) in consumers.items():
                    with contextlib.suppress(Exception):  # not created yet, or a slow answer
                        info = await js.consumer_info(stream, durable, timeout=1)
                        waiting = info.num_pending + info.num_ack_pending
                        self.max[name] = max(self.max[name], waiting)
                await wait_event(self.stopped, 0.5)
        finally:
            await nc.close()


async def place_jobs(run: Run) -> dict[str, Any]:
    """Submits the jobs and waits until every one is assigned; returns the figures."""
    from sqlalchemy.ext.asyncio import create_async_engine

    servers = run.platform.servers
    assert servers is not None
    engine = create_async_engine(servers.postgres.url, pool_size=2)
    submitted = Submitted()
    backlog = Backlog()
    watching = asyncio.create_task(backlog.watch(servers.nats.url))
    try:
        sequences = await stream_sequences(servers.nats.url)
        before = cpu_snapshot(run.groups, run.each)
        first_submit = time.time()
        if run.via is Via.jetstream:
            submitting = submit_via_jetstream(
                servers.postgres.url, servers.nats.url, run.jobs, submitted
            )
        else:
            assert run.token is not None
            submitting = submit_via_gateway(
                run.platform.gateway_url,
                run.token,
                run.jobs,
                run.batch,
                run.concurrency,
                submitted,
                run.rate,
            )
        submit_task = asyncio.create_task(submitting)
        deadline = time.monotonic() + run.timeout
        with progress_bar(run.console) as progress:
            bar_submitted = progress.add_task("jobs submitted", total=run.jobs)
            bar_assigned = progress.add_task("jobs assigned", total=run.jobs)
            while True:
                assigned = await _count(engine, "assigned_at IS NOT NULL")
                progress.update(bar_submitted, completed=submitted.jobs)
                progress.update(bar_assigned, completed=assigned)
                if submit_task.done() and submit_task.exception() is not None:
                    raise BenchError(f"submitting failed: {submit_task.exception()}")
                if assigned >= run.jobs:
                    break
                run.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"only {assigned} of {run.jobs} jobs assigned ({submitted.jobs} "
                        f"submitted) {run.timeout:.0f} s after the first submit"
                    )
                await asyncio.sleep(0.2)
        after = cpu_snapshot(run.groups, run.each)
        await submit_task
        times = await _job_times(engine)
        # The daemons' `finished` events must all come back: the events path lost nothing.
        finished, finish_deadline = 0, time.monotonic() + 60
        with run.console.status("waiting for every job to finish"):
            while time.monotonic() < finish_deadline:
                finished = await _count(engine, "status = 'succeeded'")
                if finished >= run.jobs:
                    break
                await asyncio.sleep(0.2)
        # Jobs placed more than once (a task taken back, e.g. not accepted in time): their
        # assigned_at is their last assignment's.
        retried = await _count(engine, "attempt > 0")
        sequences = {
            name: last - sequences[name]
            for name, last in (await stream_sequences(servers.nats.url)).items()
        }
    finally:
        backlog.stopped.set()
        await asyncio.gather(watching, return_exceptions=True)
        await engine.dispose()
    if len(times) != run.jobs or submitted.jobs != run.jobs:
        raise BenchError(
            f"{run.jobs} jobs asked for, {submitted.jobs} accepted, {len(times)} stored"
        )
    last_assigned = max(a for _, a in times if a is not None)
    span = last_assigned.timestamp() - first_submit
    latencies = sorted((a - c).total_seconds() * 1000 for c, a in times if a is not None)
    cpu, cpu_each = cpu_seconds(before, after)
    others = other_top(before, after)
    assert submitted.done_at is not None
    return {
        "jobs_per_s": round(run.jobs / span, 1),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(latencies[-1], 1),
        "assigned": len(latencies),
        "succeeded": finished,
        "retried": retried,
        "backlog_max": backlog.max,
        "submit_per_s": round(run.jobs / (submitted.done_at - first_submit), 1),
        "submit_requests": submitted.requests,
        "placement_s": round(span, 2),
        "cpu_window_s": round(after.at - before.at, 2),
        "cpu_s": cpu,
        "scheduler_cpu_s": cpu_each,
        "other_top_cpu_s": others,
        # Every job's messages through JetStream, once it finished (heartbeats aside).
        "messages_per_job": {name: round(n / run.jobs, 3) for name, n in sequences.items()},
    }


def decision_ms(machines: list[int]) -> dict[str, dict[str, float]]:
    """One in-memory placement decision over fleets of these sizes (scheduler.fleet_index)."""
    from scheduler.fleet_index import decision_timings

    return {str(n): decision_timings(n) for n in machines}


# --- the stack -------------------------------------------------------------------------


def start_platform(tmp: Path, schedulers: int, stops: list[Callable[[], None]]) -> LocalPlatform:
    """NATS, Postgres and S3 (ours to stop), then every service but a provider daemon."""
    from migrations.runner import upgrade

    nats_server = start_nats(tmp / "nats")
    stops.append(nats_server.stop)
    postgres = start_postgres(tmp / "postgres")
    stops.append(postgres.stop)
    s3 = start_s3(tmp / "s3")
    stops.append(s3.stop)
    upgrade(postgres.url)
    platform = LocalPlatform(
        data_dir=tmp / "platform",
        gateway_port=free_port(),
        # No container runs in this benchmark: no podman.
        servers=Servers(nats_server, postgres, s3, None),  # type: ignore[arg-type]
        owns_servers=False,
        schedulers=schedulers,
        settings={
            "GPUMARKET_ALLOW_SIMULATED": "true",
            # One requester submits every job: the per-principal limit must not be what
            # is measured.
            "GPUMARKET_RATE_LIMIT_PER_PRINCIPAL": "1000000/second",
        },
    )
    platform.data_dir.mkdir(parents=True)
    return platform


def log_errors(log_dir: Path, prefix: str, console: Console) -> int:
    """Errors logged (JSON lines) by the processes whose name starts with `prefix`; the
    last one is shown, as a lead."""
    errors = []
    for path in sorted(log_dir.glob(f"{prefix}*.log")):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    if record.get("level") in ("error", "critical"):
                        errors.append(record)
    if errors:
        last = errors[-1]
        # The exception's own line, not SQLAlchemy's trailing "[SQL: ...]" or link.
        exc = [
            line
            for line in (last.get("exc") or "").splitlines()
            if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]
        ]
        console.print(
            f"[yellow]{prefix} logged {len(errors)} error(s); last:[/] "
            f"{last.get('msg')} {exc[-1][:300] if exc else ''}",
            soft_wrap=True,
        )
    return len(errors)


def keep_logs(tmp: Path, log_dir: Path) -> None:
    """Every process' log, copied out of the temp dir before it goes."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for path in [*tmp.glob("*/logs/*.log"), *tmp.glob("logs/*.log"), *tmp.glob("*/*.log")]:
        with contextlib.suppress(OSError):
            shutil.copy(path, log_dir / path.name)


def register_requester(gateway_url: str, database_url: str) -> str:
    """A requester with credits for every job the bench submits (its holds included)."""
    from gpumarket.admin import grant_credits

    client = Client(gateway_url)
    email = f"bench-{secrets.token_hex(4)}@example.com"
    tokens = client.register_or_login(email, secrets.token_urlsafe(16), "requester")
    asyncio.run(grant_credits(database_url, email, BENCH_CREDITS))
    return tokens.access_token


# --- the run ---------------------------------------------------------------------------


def default_timeout(jobs: int) -> float:
    """Seconds from the first submit until every job must be assigned."""
    return 120 + jobs / 10


def run_scheduling_bench(
    providers: int,
    jobs: int,
    schedulers: int,
    via: Via,
    batch: int,
    concurrency: int,
    daemon_processes: int,
    timeout: float | None,
    decision_machines: list[int],
    console: Console,
    log_dir: Path | None = None,
    rate: float | None = None,
) -> dict[str, Any]:
    """Runs the benchmark; prints a table, then the figures as JSON on the last line."""
    if batch > 1 and via is not Via.gateway:
        raise BenchError("--batch is for --via gateway (POST /v1/jobs/batch)")
    if rate is not None and via is not Via.gateway:
        raise BenchError("--rate is for --via gateway (requests a second)")
    raise_nofile(concurrency + 1024)  # our HTTP connections, with room
    fleet = make_fleet(providers, random.Random(providers))
    wall_start = time.monotonic()
    stops: list[Callable[[], None]] = []
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-sched-") as tmp_dir:
        tmp = Path(tmp_dir)
        platform: LocalPlatform | None = None
        errors: dict[str, int] = {}
        try:
            with console.status("starting NATS, PostgreSQL and S3") as status:
                platform = start_platform(tmp, schedulers, stops)
                servers = platform.servers
                assert servers is not None
                status.update(f"inserting {providers} providers")
                gpus = asyncio.run(insert_fleet(servers.postgres.url, fleet))
                asyncio.run(create_daemons_consumer(servers.nats.url))
                status.update(f"starting the services and {schedulers} scheduler(s)")
                stops.append(platform.stop)
                platform.start_services()
                status.update("starting the simulated daemons")
                workers = start_daemons(servers.nats.url, fleet, daemon_processes, tmp)
                stops.append(workers.shutdown)
                wait_daemons_ready(workers)
                raw_messages = max(jobs, RAW_MIN_MESSAGES)
                status.update(f"raw JetStream: {raw_messages} messages")
                # On uvloop, as the scheduler and the daemons run: the best this
                # transport does here (plain asyncio costs a fifth more per message).
                raw = run_on_uvloop(
                    jetstream_raw_rate(servers.nats.url, raw_messages, servers.nats.proc.pid)
                )
                token = (
                    register_requester(platform.gateway_url, servers.postgres.url)
                    if via is Via.gateway
                    else None
                )
            names = {p.name: p.process.pid for p in platform.processes}
            run = Run(
                platform=platform,
                workers=workers,
                console=console,
                jobs=jobs,
                via=via,
                batch=batch,
                concurrency=concurrency,
                timeout=timeout or default_timeout(jobs),
                rate=rate,
                token=token,
                groups={
                    "gateway": [names["gateway"]],
                    "schedulers": [names[n] for n in platform.scheduler_names],
                    "postgres": [servers.postgres.proc.pid],
                    "nats": [servers.nats.proc.pid],
                    "daemons": [p.pid for p in workers.processes],
                    "registry": [names["provider_registry"]],
                    "auth": [names["auth_service"]],
                    "storage": [names["storage_service"]],
                    "s3": [servers.s3.proc.pid],
                },
                each={n: names[n] for n in platform.scheduler_names},
            )
            figures = asyncio.run(place_jobs(run))
            daemon_errors = workers.total(ERRORS)
            tasks_answered = workers.total(TASKS)
            stops.remove(workers.shutdown)
            figures |= daemon_stats(workers, tmp)
        finally:
            if platform is not None:  # on failure too: the logs go with the temp dir
                errors = {
                    name: log_errors(platform.log_dir, name, console)
                    for name in ("gateway", "scheduler", "provider_registry")
                }
            if log_dir is not None:
                with console.status("stopping"):
                    while stops:
                        with contextlib.suppress(Exception):
                            stops.pop()()
                keep_logs(tmp, log_dir)
                console.print(f"logs kept in {log_dir}")
            with console.status("stopping"):
                while stops:
                    with contextlib.suppress(Exception):
                        stops.pop()()
    with console.status(f"timing placement decisions over {decision_machines} machines"):
        decisions = decision_ms(decision_machines)
    jobs_per_s = figures.pop("jobs_per_s")
    messages_per_job = sum(figures["messages_per_job"].values())
    result: dict[str, Any] = {
        "providers": providers,
        "gpus": gpus,
        "jobs": jobs,
        "schedulers": schedulers,
        "via": via.value,
        "batch": batch,
        "jobs_per_s": jobs_per_s,
        "p50_ms": figures.pop("p50_ms"),
        "p99_ms": figures.pop("p99_ms"),
        "jetstream_raw_per_s": round(raw.per_s, 1),
        "ratio": round(jobs_per_s / raw.per_s, 4),
        "jetstream_raw_cpu_us": {
            "server": round(raw.server_us, 1),
            "client": round(raw.client_us, 1),
        },
        # What the messages alone allow on this machine's cores: jobs_per_s can't pass it.
        "transport_bound_jobs_per_s": round(
            raw.jobs_bound(messages_per_job, len(os.sched_getaffinity(0))), 1
        ),
        "decision_ms": decisions,
        **figures,
        "concurrency": concurrency if via is Via.gateway else None,
        "rate": rate,
        "daemon_processes": daemon_processes,
        "tasks_answered": tasks_answered,
        "daemon_errors": daemon_errors,
        "log_errors": errors,
        "wall_s": round(time.monotonic() - wall_start, 1),
    }
    print_table(result, console)
    print(json.dumps(result), flush=True)
    return result


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"{result['jobs']} jobs on {result['providers']} simulated providers "
        f"({result['gpus']} GPUs), {result['schedulers']} scheduler(s), via {result['via']}"
        + (f", batch {result['batch']}" if result["batch"] > 1 else "")
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, dict):
            for sub, item in value.items():
                if isinstance(item, dict):
                    item = ", ".join(f"{k} {v}" for k, v in item.items())
                table.add_row(f"{key}.{sub}", "-" if item is None else str(item))
        else:
            table.add_row(key, "-" if value is None else str(value))
    console.print(table)


# The keys every run's JSON line holds (more may follow).
RESULT_KEYS = ("providers", "jobs", "schedulers", "via", "batch", "jobs_per_s", "p50_ms",
               "p99_ms", "jetstream_raw_per_s", "ratio", "decision_ms", "cpu_s")  # fmt: skip


if __name__ == "__main__":
    worker_main()
