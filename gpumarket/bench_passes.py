"""`gpumarket bench passes`: what one group commit of submissions, one placement pass and
one events batch cost.

The throughput benches hide the scheduler's fixed costs: under load a pass places a
batch of jobs and an events batch holds hundreds of events. In a quiet marketplace every
job gets a pass of its own and every event a batch of its own, and those fixed costs
(statements, round trips, the commit) are the scheduler's whole bill; with several
replicas the batches are smaller too.

This runs the platform's own code in this process (`scheduler.job_store.create_submissions`
as the gateway's group commit calls it, `scheduler.placement.Placer.run_pass` and
`scheduler.events.apply_events`, uvloop as in the services) against a fresh PostgreSQL
holding N simulated providers: no NATS, no HTTP, no daemons. For each size S, R times:
S single-job submissions are committed together with their holds (timed), one pass
places them (timed), then one batch applies their 3 x S events (`accepted`, `started`
and `finished`, exit 0, settled with the money as in production; timed). Figures per
step: CPU of this process (the gateway's or the scheduler's share), CPU of PostgreSQL
(the server and its backends, from /proc, in clock ticks: read them as sums over R), and
wall time. The last line printed is JSON.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from common.event_loop import run_on_uvloop
from gpumarket.bench_heartbeats import (
    CLK_TCK,
    insert_fleet,
    make_fleet,
    proc_stats,
    tree_ticks,
)
from gpumarket.bench_scheduling import SPEC, BenchError
from gpumarket.localstack.postgres import start_postgres

T = TypeVar("T")

DEFAULT_SIZES = (1, 10, 100)
CREDITS = Decimal(100_000_000)


@dataclass
class Timings:
    """One step (a group commit, a pass, or an events batch) timed R times."""

    cpu_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    postgres_ticks: int = 0

    def summary(self, per: int) -> dict[str, float]:
        reps = len(self.cpu_s)
        cpu_ms = 1000 * sum(self.cpu_s) / reps
        postgres_ms = 1000 * self.postgres_ticks / CLK_TCK / reps
        return {
            "reps": reps,
            "cpu_ms": round(cpu_ms, 2),
            "postgres_cpu_ms": round(postgres_ms, 2),
            "wall_p50_ms": round(1000 * statistics.median(self.wall_s), 2),
            "cpu_ms_per_job": round((cpu_ms + postgres_ms) / per, 3),
        }


class Stopwatch:
    """CPU of this process and of PostgreSQL's processes, and wall time, around a step."""

    def __init__(self, postgres_pid: int) -> None:
        self.postgres_pid = postgres_pid

    def _postgres(self) -> int:
        return tree_ticks([self.postgres_pid], proc_stats())

    async def time(self, timings: Timings, step: Awaitable[T]) -> T:
        postgres = self._postgres()
        cpu, wall = time.process_time(), time.perf_counter()
        result = await step
        timings.wall_s.append(time.perf_counter() - wall)
        timings.cpu_s.append(time.process_time() - cpu)
        timings.postgres_ticks += self._postgres() - postgres
        return result


def _lives(placed: list[Any], t0: datetime) -> list[tuple[Any, datetime]]:
    """Each placed job's accepted, started and finished, as the simulated daemons send
    them (a job's three together), with JetStream's clock a little later."""
    from common.messages import JobEvent

    events = []
    for p in placed:
        task = p.task
        common = {"job_id": task.job_id, "attempt": task.attempt, "provider_id": p.provider_id}
        started, ended = t0 + timedelta(seconds=1), t0 + timedelta(seconds=2)
        events += [
            JobEvent(type="accepted", at=t0, **common),
            JobEvent(type="started", at=started, **common),
            JobEvent(
                type="finished",
                at=ended,
                exit_code=0,
                outcome="exited",
                started_at=started,
                ended_at=ended,
                **common,
            ),
        ]
    return [(event, event.at + timedelta(milliseconds=5)) for event in events]


async def _measure(
    database_url: str, postgres_pid: int, sizes: list[int], reps: int
) -> dict[str, Any]:
    from billing import funding
    from billing.settings import BillingSettings
    from common.db import make_engine, make_sessionmaker
    from scheduler import job_store, states
    from scheduler.events import apply_events
    from scheduler.fleet_index import FleetIndex, Weights
    from scheduler.placement import Placer
    from scheduler.retries import RetryPolicy
    from scheduler.schemas import JobSpec
    from scheduler.settings import SchedulerSettings

    billing = BillingSettings(dev_mode=True)
    defaults = SchedulerSettings.model_fields
    engine = make_engine(database_url)
    db = make_sessionmaker(engine)
    spec = JobSpec.model_validate(SPEC)
    watch = Stopwatch(postgres_pid)
    try:
        placer = Placer(
            db,
            FleetIndex(Weights()),
            allow_simulated=True,
            batch=max(defaults["placement_batch"].default, max(sizes)),
            scan=defaults["placement_scan"].default,
        )
        await placer.resync()
        results: dict[str, Any] = {}
        for size in sizes:
            commits, passes, batches = Timings(), Timings(), Timings()
            for rep in range(reps + 1):  # the first round warms up (statements, caches)
                owner = str(uuid.uuid4())
                async with db.begin() as session:
                    await funding.add_credits(session, owner, CREDITS, reference=owner)

                submissions = [job_store.Submission(owner, [spec]) for _ in range(size)]

                async def commit(submissions: list[Any] = submissions) -> list[Any]:
                    async with db.begin() as session:
                        return await job_store.create_submissions(session, submissions, billing)

                created = await watch.time(commits if rep else Timings(), commit())
                if not all(isinstance(jobs, list) for jobs in created):
                    raise BenchError("a submission was refused")
                result = await watch.time(passes if rep else Timings(), placer.run_pass())
                if len(result.placements) != size:
                    raise BenchError(f"a pass placed {len(result.placements)} of {size} jobs")
                events = _lives(result.placements, datetime.now(UTC))

                async def batch(events: list[Any] = events) -> list[Any]:
                    async with db.begin() as session:
                        effects, _ = await apply_events(session, events, RetryPolicy(), billing)
                    return effects

                effects = await watch.time(batches if rep else Timings(), batch())
                succeeded = sum(e.new_status == states.SUCCEEDED for e in effects)
                if succeeded != size:
                    raise BenchError(f"an events batch ended {succeeded} of {size} jobs")
            results[str(size)] = {
                "group_commit": commits.summary(size),
                "pass": passes.summary(size),
                "events_batch": {"events": 3 * size, **batches.summary(size)},
            }
        return results
    finally:
        await engine.dispose()


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"one step, mean of {result['reps']} (CPU in ms)")
    for column in ("step", "jobs", "own CPU", "Postgres CPU", "wall p50", "CPU per job"):
        table.add_column(column, justify="right" if column != "step" else "left")
    for size, steps in result["sizes"].items():
        for name, step in (
            ("group commit", steps["group_commit"]),
            ("pass", steps["pass"]),
            (f"events batch ({steps['events_batch']['events']} events)", steps["events_batch"]),
        ):
            table.add_row(
                name,
                size,
                f"{step['cpu_ms']:.2f}",
                f"{step['postgres_cpu_ms']:.2f}",
                f"{step['wall_p50_ms']:.2f}",
                f"{step['cpu_ms_per_job']:.3f}",
            )
    console.print(table)


def run_passes_bench(providers: int, sizes: list[int], reps: int, console: Console) -> dict:
    from migrations.runner import upgrade

    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-passes-") as tmp:
        with console.status("starting PostgreSQL"):
            postgres = start_postgres(Path(tmp) / "postgres")
        try:
            with console.status(f"migrating, inserting {providers} providers"):
                upgrade(postgres.url)
                fleet = make_fleet(providers, random.Random(providers))
                gpus = run_on_uvloop(insert_fleet(postgres.url, fleet))
            if gpus < max(sizes):
                raise BenchError(f"{gpus} GPUs cannot take a pass of {max(sizes)} jobs")
            with console.status("timing group commits, passes and events batches"):
                sizes_result = run_on_uvloop(_measure(postgres.url, postgres.proc.pid, sizes, reps))
        finally:
            postgres.stop()
    result = {"providers": providers, "gpus": gpus, "reps": reps, "sizes": sizes_result}
    print_table(result, console)
    print(json.dumps(result))
    return result
