"""A batch of events applied in one transaction ends exactly where the same events
applied one batch each end, and costs the same few statements however many it holds.

Each test builds two identical worlds (a funded owner, its jobs, one one-GPU machine per
job), feeds one world the events as one batch and the other one event per batch, and
compares everything the events write: jobs, GPUs, outputs, usage, ledger, balances,
reliability counts, and what the worker is told.
"""

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker

from billing import funding, reports
from billing.models import EARNINGS, Account, Transfer, Usage
from billing.settlement import Charged
from common.messages import JobEvent, OutputFile
from provider_registry.models import Gpu, Provider, ProviderTaskDay
from scheduler import job_store, states
from scheduler.events import Effect, apply_events
from scheduler.models import Job, JobOutput
from tests.fixtures.database import statements
from tests.provider_registry.factories import create_provider
from tests.scheduler.placing import BILLING, NO_BACKOFF, place, spec

# The daemons' clock, well before the jobs exist: a time from the events tells itself
# apart from the transaction's now().
T0 = datetime(2025, 6, 1, 12, tzinfo=UTC)
# A machine no job ran on, and a job nobody submitted: their events are stale.
STRANGER = str(uuid.uuid4())
UNKNOWN_JOB = str(uuid.uuid4())

# (job index or None for UNKNOWN_JOB, event type, fields: attempt, provider="stranger",
# t (seconds after T0), and the event's own fields with times in seconds after T0).
Step = tuple[int | None, str, dict[str, Any]]
Delivered = list[tuple[JobEvent, datetime | None]]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass(frozen=True)
class World:
    owner: str
    jobs: list[str]
    # providers[i] ran the first attempt of jobs[i].
    providers: list[str]


async def world(db: async_sessionmaker, specs: list[dict[str, Any]]) -> World:
    owner = str(uuid.uuid4())
    async with db.begin() as session:
        await funding.add_credits(session, owner, Decimal(10_000), reference=owner)
        for _ in specs:
            await create_provider(session, gpus=1)
        jobs = [
            await job_store.create_job(session, owner, spec(max_duration_s=3600, **kw), BILLING)
            for kw in specs
        ]
    placed = {p.task.job_id: p.provider_id for p in (await place(db)).placements}
    assert set(placed) == {job.id for job in jobs}
    return World(owner, [job.id for job in jobs], [placed[job.id] for job in jobs])


async def twins(db: async_sessionmaker, specs: list[dict[str, Any]]) -> tuple[World, World]:
    return await world(db, specs), await world(db, specs)


def deliveries(w: World, steps: list[Step]) -> Delivered:
    out: Delivered = []
    for i, type_, fields in steps:
        kw = dict(fields)
        t = kw.pop("t")
        provider = kw.pop("provider", None)
        for key in ("started_at", "ended_at"):
            if key in kw:
                kw[key] = at(kw[key])
        out.append(
            (
                JobEvent(
                    job_id=UNKNOWN_JOB if i is None else w.jobs[i],
                    attempt=kw.pop("attempt", 0),
                    provider_id=STRANGER if provider == "stranger" else w.providers[i or 0],
                    type=type_,
                    at=at(t),
                    **kw,
                ),
                at(t + 0.5),  # JetStream's clock: received half a second later
            )
        )
    return out


def life(i: int, exit_code: int = 0, **finished: Any) -> list[Step]:
    """A job's four events: accepted, started, exited, finished."""
    return [
        (i, "accepted", {"t": 1}),
        (i, "started", {"t": 2}),
        (i, "exited", {"t": 62, "exit_code": exit_code}),
        (
            i,
            "finished",
            {
                "t": 70,
                "exit_code": exit_code,
                "outcome": "exited",
                "started_at": 2,
                "ended_at": 62,
                **finished,
            },
        ),
    ]


def by_arrival(*lives: list[Step]) -> list[Step]:
    """Jobs running side by side: every job's first event, then every job's second..."""
    longest = max(len(steps) for steps in lives)
    return [steps[k] for k in range(longest) for steps in lives if k < len(steps)]


async def in_one_batch(db: async_sessionmaker, events: Delivered) -> tuple[list, list]:
    async with db.begin() as session:
        return await apply_events(session, events, NO_BACKOFF, BILLING)


async def one_by_one(db: async_sessionmaker, events: Delivered) -> tuple[list, list]:
    effects, charged = [], []
    for delivered in events:
        e, c = await in_one_batch(db, [delivered])
        effects += e
        charged += c
    return effects, charged


def _when(t: datetime | None) -> float | str | None:
    """An event's time as seconds after T0; the transaction's now() only as 'now'."""
    if t is None:
        return None
    return (t - T0).total_seconds() if t < at(86_400) else "now"


def _effect(e: Effect) -> tuple:
    ended = e.ended
    return (
        e.gpus_freed,
        e.requeued,
        e.retry_reason,
        e.new_status,
        e.ran,
        e.waited_s,
        e.job is not None,
        None if ended is None else (ended.attempt, ended.chargeable, ended.reason),
    )


def _charged(charged: list[Charged]) -> list[tuple]:
    return sorted((c.gpu_model, c.gpu_hours, c.cost, c.fee) for c in charged)


def _job(j: Job, machine: dict[str, str]) -> dict[str, Any]:
    return {
        "status": j.status,
        "attempt": j.attempt,
        "machine": machine.get(j.provider_id),  # type: ignore[arg-type]
        "avoids": [machine[p] for p in j.avoid_providers],
        "gpus": len(j.gpu_uuids),
        "gpu_model": j.gpu_model,
        "price": j.price_per_gpu_hour,
        "exit_code": j.exit_code,
        "failure_reason": j.failure_reason,
        "log_tail": j.log_tail,
        "waiting_reason": j.waiting_reason,
        "backoff": j.not_before is not None,
        "accepted_at": _when(j.accepted_at),
        "started_at": _when(j.started_at),
        "started_seen_at": _when(j.started_seen_at),
        "stop_requested_at": _when(j.stop_requested_at),
        "finished_at": _when(j.finished_at),
        "settled_at": _when(j.settled_at),
    }


async def state(db: async_sessionmaker, w: World) -> dict[str, Any]:
    """Everything the events wrote for this world, with its ids replaced by positions."""
    machine = {p: f"machine {i}" for i, p in enumerate(w.providers)}
    job = {j: i for i, j in enumerate(w.jobs)}
    async with db() as session:
        jobs = (await session.scalars(select(Job).where(Job.id.in_(w.jobs)))).all()
        gpus = (
            await session.execute(
                select(Gpu.provider_id, Gpu.reserved_job_id).where(Gpu.provider_id.in_(w.providers))
            )
        ).all()
        outputs = (
            await session.scalars(select(JobOutput).where(JobOutput.job_id.in_(w.jobs)))
        ).all()
        usage = (await session.scalars(select(Usage).where(Usage.job_id.in_(w.jobs)))).all()
        transfers = (
            await session.scalars(select(Transfer).where(Transfer.job_id.in_(w.jobs)))
        ).all()
        days = (
            await session.scalars(
                select(ProviderTaskDay).where(ProviderTaskDay.provider_id.in_(w.providers))
            )
        ).all()
        balance = await reports.balance(session, w.owner)
        owners = dict(
            (
                await session.execute(
                    select(Provider.owner_id, Provider.id).where(Provider.id.in_(w.providers))
                )
            ).all()
        )
        earnings = (
            await session.execute(
                select(Account.owner_id, Account.balance).where(
                    Account.kind == EARNINGS, Account.owner_id.in_(owners)
                )
            )
        ).all()
    return {
        "jobs": [_job(j, machine) for j in sorted(jobs, key=lambda j: job[j.id])],
        "gpus": sorted(
            (machine[p], None if r is None else job.get(r, "someone else")) for p, r in gpus
        ),
        "outputs": sorted((job[o.job_id], o.attempt, o.path, o.size, o.sha256) for o in outputs),
        "usage": sorted(
            (
                job[u.job_id],
                u.attempt,
                machine[u.provider_id],
                u.billed_seconds,
                u.provider_seconds,
                u.platform_seconds,
                u.clock,
                u.chargeable,
                u.cost,
                u.fee,
                u.reason,
            )
            for u in usage
        ),
        "transfers": sorted(
            (t.kind, job[t.job_id], t.attempt, t.amount, t.key.replace(t.job_id, "J"))
            for t in transfers
        ),
        "balance": (balance.available, balance.held),
        "earnings": sorted((machine[owners[o]], b) for o, b in earnings),
        "reliability": sorted((machine[d.provider_id], d.ok, d.infrastructure) for d in days),
    }


async def assert_same_end(
    db: async_sessionmaker,
    specs: list[dict[str, Any]],
    steps: list[Step],
    before: Any = None,
) -> tuple[dict[str, Any], list[Effect]]:
    """Applies `steps` to twin worlds, batched and one by one, and checks they end alike.
    `before(db, world)` runs on each world first. Returns the batched world's end."""
    batched, alone = await twins(db, specs)
    if before is not None:
        await before(db, batched)
        await before(db, alone)
    effects, charged = await in_one_batch(db, deliveries(batched, steps))
    effects_alone, charged_alone = await one_by_one(db, deliveries(alone, steps))
    end = await state(db, batched)
    assert end == await state(db, alone)
    assert [_effect(e) for e in effects] == [_effect(e) for e in effects_alone]
    assert _charged(charged) == _charged(charged_alone)
    return end, effects


def statuses(end: dict[str, Any]) -> list[str]:
    return [job["status"] for job in end["jobs"]]


OUTPUT = OutputFile(path="model.bin", size=3, sha256="a" * 64)


class TestOneBatchEndsLikeOneEventAtATime:
    async def test_whole_lives_in_one_batch(self, db: async_sessionmaker) -> None:
        steps = by_arrival(
            life(0, outputs=[OUTPUT, OutputFile(path="log.txt", size=1, sha256="b" * 64)]),
            life(1, exit_code=2, log_tail="oops"),
            life(2),
        )
        end, effects = await assert_same_end(db, [{}, {}, {}], steps)
        assert statuses(end) == [states.SUCCEEDED, states.FAILED, states.SUCCEEDED]
        assert [free for _, free in end["gpus"]] == [None, None, None]
        # The exited event frees the GPU; the finished after it finds nothing to free.
        freed = [e.gpus_freed for (_, type_, _), e in zip(steps, effects, strict=True)]
        exited = [type_ == "exited" for _, type_, _ in steps]
        assert freed == exited
        assert len(end["outputs"]) == 2 and len(end["usage"]) == 3
        assert end["reliability"] == [(f"machine {i}", 1, 0) for i in range(3)]

    async def test_replays_in_the_same_batch_change_nothing_twice(
        self, db: async_sessionmaker
    ) -> None:
        first = life(0, outputs=[OUTPUT])
        # Job 1 never reports `exited`: its `finished` frees the GPU, once.
        second = [step for step in life(1) if step[1] != "exited"]
        steps = [*first, *first, *second, second[-1], second[-1], (1, "exited", {"t": 80})]
        end, effects = await assert_same_end(db, [{}, {}], steps)
        assert statuses(end) == [states.SUCCEEDED, states.SUCCEEDED]
        assert sum(e.gpus_freed for e in effects) == 2
        assert len(end["outputs"]) == 1 and len(end["usage"]) == 2
        assert end["reliability"] == [("machine 0", 1, 0), ("machine 1", 1, 0)]
        # Charged once, released once, per job.
        kinds = sorted(kind for kind, *_ in end["transfers"])
        assert kinds == sorted(["hold", "charge", "fee", "release"] * 2)

    async def test_stale_attempts_strangers_and_unknown_jobs_change_nothing(
        self, db: async_sessionmaker
    ) -> None:
        steps: list[Step] = [
            (0, "finished", {"t": 5, "attempt": 1, "exit_code": 0, "outcome": "exited"}),
            (0, "exited", {"t": 5, "provider": "stranger"}),
            (0, "finished", {"t": 6, "provider": "stranger", "outcome": "infrastructure"}),
            (None, "finished", {"t": 6, "exit_code": 0, "outcome": "exited"}),
            (1, "accepted", {"t": 1, "attempt": 3}),
            (0, "started", {"t": 7}),
            (1, "rejected", {"t": 8, "attempt": 2, "reason": "busy"}),
        ]
        end, effects = await assert_same_end(db, [{}, {}], steps)
        assert statuses(end) == [states.RUNNING, states.ASSIGNED]
        assert [e.job is not None for e in effects] == [False] * 5 + [True, False]
        assert end["usage"] == [] and end["reliability"] == []
        assert [free for _, free in end["gpus"]] == [0, 1]

    async def test_retries_requeues_and_a_cancel_in_one_batch(self, db: async_sessionmaker) -> None:
        specs: list[dict[str, Any]] = [
            {"retries": 1},  # the machine fails it: back to the queue, elsewhere
            {"retries": 2, "retry_on_exit_codes": [75]},  # the user asks for a retry
            {"retries": 0},  # the machine fails it, no retry left
            {"retries": 2},  # the daemon refuses it
            {},  # cancelled while it runs
        ]
        steps = by_arrival(
            [
                (0, "accepted", {"t": 1}),
                (0, "started", {"t": 2}),
                (0, "finished", {"t": 9, "outcome": "infrastructure", "reason": "disk"}),
                # Stale once the job went back to the queue: attempt 1, nowhere yet.
                (0, "finished", {"t": 9, "outcome": "infrastructure", "reason": "disk"}),
                (0, "exited", {"t": 10}),
                (0, "accepted", {"t": 11, "attempt": 1}),
            ],
            life(1, exit_code=75, outputs=[OUTPUT]),
            [
                (2, "accepted", {"t": 1}),
                (2, "finished", {"t": 3, "outcome": "infrastructure", "reason": "pull"}),
            ],
            [(3, "rejected", {"t": 1, "reason": "GPU busy"}), (3, "started", {"t": 2})],
            [
                (4, "accepted", {"t": 1}),
                (4, "finished", {"t": 30, "outcome": "cancelled", "exit_code": 137}),
            ],
        )

        async def cancel_running(db: async_sessionmaker, w: World) -> None:
            await in_one_batch(db, deliveries(w, [(4, "started", {"t": 0.5})]))
            async with db.begin() as session:
                await job_store.request_cancel(session, w.jobs[4], None, BILLING)

        end, effects = await assert_same_end(db, specs, steps, before=cancel_running)
        assert statuses(end) == [
            states.QUEUED,
            states.QUEUED,
            states.FAILED,
            states.QUEUED,
            states.CANCELLED,
        ]
        assert [job["attempt"] for job in end["jobs"]] == [1, 1, 0, 1, 0]
        assert [job["avoids"] for job in end["jobs"]] == [["machine 0"], [], [], ["machine 3"], []]
        # Ended without ever starting: at the transaction's time, not the daemon's.
        assert end["jobs"][2]["finished_at"] == "now"
        assert end["jobs"][4]["finished_at"] == 30
        assert [free for _, free in end["gpus"]] == [None] * 5
        assert sum(e.requeued for e in effects) == 3
        # The infrastructure faults count against their machines, the exit code does not.
        assert end["reliability"] == [
            ("machine 0", 0, 1),
            ("machine 1", 1, 0),
            ("machine 2", 0, 1),
            ("machine 3", 0, 1),
        ]

    async def test_forty_jobs_side_by_side(self, db: async_sessionmaker) -> None:
        specs, steps = forty_jobs()
        end, _ = await assert_same_end(db, specs, steps)
        assert statuses(end).count(states.SUCCEEDED) == 30
        assert statuses(end).count(states.QUEUED) == 5
        assert statuses(end).count(states.FAILED) == 5


async def test_batches_over_the_same_jobs_in_any_order_never_deadlock(
    db: async_sessionmaker,
) -> None:
    """Two replicas holding the same jobs' events in opposite orders lock them in one
    order (by id), so one waits for the other instead of deadlocking."""
    w = await world(db, [{}] * 20)
    accepted = deliveries(w, [(i, "accepted", {"t": 1}) for i in range(20)])
    started = deliveries(w, [(i, "started", {"t": 2}) for i in reversed(range(20))])
    for _ in range(3):
        await asyncio.gather(in_one_batch(db, accepted), in_one_batch(db, started))
    end = await state(db, w)
    assert statuses(end) == [states.RUNNING] * 20
    assert {job["accepted_at"] for job in end["jobs"]} <= {1.0, 2.0}


def forty_jobs(n: int = 40) -> tuple[list[dict[str, Any]], list[Step]]:
    """n jobs, four events each, side by side: most succeed, one in eight fails for
    its user, one in eight is sent back by its machine."""
    specs: list[dict[str, Any]] = [{"retries": 1}] * n
    lives = []
    for i in range(n):
        if i % 8 == 3:
            lives.append(life(i, exit_code=1, log_tail="bad input"))
        elif i % 8 == 5:
            lives.append(life(i, outcome="infrastructure", reason="disk"))
        else:
            lives.append(life(i, outputs=[OUTPUT]))
    return specs, by_arrival(*lives)


# 15 today: lock the jobs, write them, free the GPUs, outputs, reliability counts; then
# settlement: attempts settled before, the jobs' settled_at, machines' owners, lock the
# accounts (twice more to open missing ones), what is left on hold, usage, transfers,
# entries. Before batching, 40 jobs x 4 events took 518.
MOST_STATEMENTS_PER_BATCH = 16


async def test_a_batch_costs_the_same_few_statements_however_many_events(
    db: async_sessionmaker,
) -> None:
    sizes = (8, 40)
    # Both worlds first: jobs sent back to the queue would be placed on the next one.
    worlds = {n: await world(db, forty_jobs(n)[0]) for n in sizes}
    sent: dict[int, list[str]] = {}
    for n, w in worlds.items():
        events = deliveries(w, forty_jobs(n)[1])
        with statements(db) as sent[n]:
            await in_one_batch(db, events)
        assert statuses(await state(db, w)).count(states.SUCCEEDED) == n * 6 // 8
    assert len(sent[40]) == len(sent[8]) <= MOST_STATEMENTS_PER_BATCH, sent[40]
    assert sum("FOR UPDATE" in s and "FROM jobs" in s for s in sent[40]) == 1
