"""The scheduler process: consumes JOBS and EVENTS, runs placement passes, publishes tasks.

Postgres is the source of truth and JetStream the transport: a jobs.submitted message
only wakes the placement loop, and every pass reads the queued jobs from Postgres, so a
job whose message was lost is still placed by the next pass (the sweeper role).
Several replicas may run at once: job and GPU rows are locked with SKIP LOCKED.
"""

import asyncio
import logging
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import uvicorn
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.errors import NotJSMessageError
from nats.js import JetStreamContext
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker

from billing.metrics import count_charges
from common import subjects
from common.aio import wait_event
from common.db import check_database, make_engine, make_sessionmaker
from common.embedded_server import EmbeddedServer
from common.event_loop import run_on_uvloop
from common.heap import settle_after_startup
from common.http import NO_TELEMETRY, install_common
from common.logging import configure_logging
from common.messages import JobEvent, ProviderLost, TaskCancel
from common.nats_client import connect_nats
from common.service_app import register_in_consul
from common.streams import ensure_streams
from scheduler import lifecycle, placement, settling, states
from scheduler.events import apply_events
from scheduler.fleet_index import FleetIndex, Weights
from scheduler.metrics import (
    EVENTS,
    FLEET_MACHINES,
    PASS_SECONDS,
    PLACEMENTS,
    PROVIDER_LOSSES,
    RACES,
    RETRIES,
    RUN_SECONDS,
    TAKEN_BACK,
    TRANSITIONS,
    WAIT_SECONDS,
    observe_unfinished,
)
from scheduler.retries import RetryPolicy, Stopped
from scheduler.settings import SchedulerSettings

log = logging.getLogger("scheduler")

# Events applied per transaction, at most. A batch costs the same few statements however
# big (scheduler/events.py): at 128 the events backlog grew to ~6,000 under 450 jobs/s of
# submissions, at 512 it stays near 1,000.
FETCH_BATCH = 512
# An events batch smaller than this is followed by a wait (Linger).
EVENTS_LINGER_BELOW = FETCH_BATCH // 2


@dataclass(frozen=True)
class Linger:
    """After a batch of fewer than `below` messages, wait `seconds` before the next fetch.

    A batch costs the same dozen statements whatever its size (scheduler/events.py), and
    replicas sharing a consumer each fetch as soon as they are free: three of them ran
    six times as many events batches as one did for the same jobs (BENCHMARKS.md). A
    replica with a backlog fetches big batches and never waits; an idle one answers the
    first event at once and collects the ones that follow for `seconds`.
    """

    below: int
    seconds: float


@dataclass(frozen=True)
class Delivery:
    data: bytes
    # When JetStream stored the message: the platform's clock for what it reports.
    at: datetime


def _delivery(msg) -> Delivery:  # type: ignore[no-untyped-def]
    try:
        at = msg.metadata.timestamp
    except NotJSMessageError:  # a core NATS message: now is the next best clock
        at = datetime.now(UTC)
    return Delivery(msg.data, at if at.tzinfo else at.replace(tzinfo=UTC))


class Scheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        nc: NATS,
        js: JetStreamContext,
        sessionmaker: async_sessionmaker,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.sessionmaker = sessionmaker
        self.wake = asyncio.Event()
        # The last pass's task publishes, still going while the next pass runs.
        self._publishing: asyncio.Task[None] | None = None
        self.policy = RetryPolicy(settings.retry_backoff_s, settings.retry_backoff_max_s)
        weights = Weights(
            price=settings.score_price_weight,
            reliability=settings.score_reliability_weight,
            packing=settings.score_packing_weight,
        )
        self.placer = placement.Placer(
            sessionmaker,
            # Its own order among equally good machines (FleetIndex): replicas deciding
            # the same jobs at once name different GPUs.
            FleetIndex(weights, tie_seed=secrets.randbits(63)),
            allow_simulated=settings.simulated_allowed,
            batch=settings.placement_batch,
            scan=settings.placement_scan,
        )

    async def placement_loop(self, stop: asyncio.Event) -> None:
        resynced_at = 0.0
        while not stop.is_set():
            if time.monotonic() - resynced_at > self.settings.fleet_resync_interval_s:
                try:
                    FLEET_MACHINES.set(await self.placer.resync())
                    resynced_at = time.monotonic()
                except Exception:
                    log.exception("fleet reload failed; retrying")
                    await asyncio.sleep(1)
                    continue
            try:
                full = await self.placement_pass()
            except Exception:
                log.exception("placement pass failed; retrying")
                await asyncio.sleep(1)
                continue
            if not full:
                # Nothing more to place now: sleep until a job, freed GPUs or the timer.
                await wait_event(self.wake, self.settings.placement_interval_s)
                self.wake.clear()
        await self._published()

    async def placement_pass(self) -> bool:
        """One pass; True when it filled its batch (more may be waiting right now)."""
        started = time.perf_counter()
        result = await self.placer.run_pass()
        RACES.inc(result.races_lost)
        FLEET_MACHINES.set(len(self.placer.index))
        if result.placements:
            # Published while the next pass reads and decides (its jobs wait for that,
            # not for these publishes); one pass's publishes in flight at a time.
            await self._published()
            self._publishing = asyncio.create_task(self._dispatch_all(result.placements))
        PASS_SECONDS.observe(time.perf_counter() - started)
        return len(result.placements) >= self.settings.placement_batch

    async def _published(self) -> None:
        """Waits for the last pass's publishes to end."""
        if self._publishing is not None:
            await self._publishing
            self._publishing = None

    async def _dispatch_all(self, placements: list[placement.Placement]) -> None:
        try:
            await asyncio.gather(*(self._dispatch(p) for p in placements))
        except Exception:
            # A task neither sent nor taken back is caught by the accept deadline.
            log.exception("publishing tasks failed")

    async def _dispatch(self, placed: placement.Placement) -> None:
        task, provider_id = placed.task, placed.provider_id
        try:
            await self.js.publish(
                subjects.tasks_subject(provider_id),
                task.model_dump_json().encode(),
                headers={"Nats-Msg-Id": subjects.msg_id(task.job_id, task.attempt, "run")},
            )
        except Exception as exc:
            log.warning(
                "task publish failed; job back to queue",
                extra={"job_id": task.job_id, "error": str(exc)},
            )
            async with self.sessionmaker.begin() as session:
                await placement.unassign(
                    session,
                    task.job_id,
                    task.attempt,
                    "task could not be sent to the provider; retrying",
                )
            return
        PLACEMENTS.inc()
        TRANSITIONS.labels(states.ASSIGNED).inc()
        log.info(
            "job assigned",
            extra={
                "job_id": task.job_id,
                "provider_id": provider_id,
                "attempt": task.attempt,
                "gpus": task.gpu_uuids,
            },
        )

    async def on_job_submitted(self, _: list[Delivery]) -> None:
        self.wake.set()

    async def on_events(self, batch: list[Delivery]) -> None:
        events = []
        for delivery in batch:
            try:
                events.append((JobEvent.model_validate_json(delivery.data), delivery.at))
            except ValidationError:
                log.warning("invalid job event dropped")
        # In arrival order: apply_events locks the batch's jobs in one order itself.
        async with self.sessionmaker.begin() as session:
            effects, charged = await apply_events(session, events, self.policy, self.settings)
        count_charges(charged)
        wake = False
        for (event, _), effect in zip(events, effects, strict=True):
            EVENTS.labels(event.type).inc()
            if effect.requeued:
                TAKEN_BACK.labels("task failed").inc()
                RETRIES.labels(effect.retry_reason or "infrastructure").inc()
            if effect.waited_s is not None:
                WAIT_SECONDS.observe(effect.waited_s)
            if effect.ran is not None:
                RUN_SECONDS.labels(effect.ran[0]).observe(effect.ran[1])
            if effect.new_status:
                TRANSITIONS.labels(effect.new_status).inc()
                log.info(
                    "job %s",
                    effect.new_status,
                    extra={"job_id": event.job_id, "attempt": event.attempt},
                )
            wake = wake or effect.gpus_freed or effect.requeued
        if wake:
            self.wake.set()

    async def on_provider_lost(self, batch: list[Delivery]) -> None:
        for delivery in batch:
            await self._provider_lost(delivery.data)

    async def _provider_lost(self, data: bytes) -> None:
        try:
            lost = ProviderLost.model_validate_json(data)
        except ValidationError:
            log.warning("invalid provider.lost message dropped")
            return
        async with self.sessionmaker.begin() as session:
            stopped = await lifecycle.on_provider_lost(session, lost, self.policy, self.settings)
        PROVIDER_LOSSES.inc()
        TAKEN_BACK.labels("provider lost").inc(len(stopped))
        RETRIES.labels("provider_lost").inc(sum(s.requeued for s in stopped))
        log.warning(
            "provider lost",
            extra={"provider_id": lost.provider_id, "jobs": [s.job_id for s in stopped]},
        )
        await self._stop_at_providers(stopped, "lost")
        if stopped:
            self.wake.set()

    async def lifecycle_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_event(stop, self.settings.lifecycle_interval_s)
            try:
                await self.lifecycle_sweep()
            except Exception:
                log.exception("lifecycle sweep failed; retrying")

    async def _events_backlog(self) -> int | None:
        try:
            info = await self.js.consumer_info(
                subjects.EVENTS_STREAM, subjects.SCHEDULER_EVENTS_DURABLE
            )
        except Exception as exc:
            log.warning("events consumer unreadable", extra={"error": str(exc)})
            return None
        return info.num_pending + info.num_ack_pending

    async def lifecycle_sweep(self) -> None:
        settings = self.settings
        now = datetime.now(UTC)
        unaccepted: list[Stopped] = []
        # An `accepted` still waiting in our own backlog is not the daemon's fault: judge
        # the deadline only when the scheduler is caught up with the events.
        backlog = await self._events_backlog()
        if backlog is not None and backlog <= settings.events_backlog_limit:
            unaccepted = await lifecycle.expire_unaccepted(
                self.sessionmaker, now, settings.accept_timeout_s, self.policy, settings
            )
        else:
            log.info("events backlog; accept deadlines wait", extra={"backlog": backlog})
        overdue = await lifecycle.expire_overdue(
            self.sessionmaker, now, settings.overdue_grace_s, settings
        )
        # Backstop for a job some path ended without settling: its hold comes back.
        await settling.settle_stragglers(
            self.sessionmaker, settings, now - timedelta(seconds=settings.settle_after_s)
        )
        async with self.sessionmaker() as session:
            unconfirmed = await lifecycle.unconfirmed_stops(session, now, settings.stop_resend_s)
            await observe_unfinished(session)
        TAKEN_BACK.labels("not accepted").inc(len(unaccepted))
        RETRIES.labels("not_accepted").inc(sum(s.requeued for s in unaccepted))
        TRANSITIONS.labels(states.TIMED_OUT).inc(len(overdue))
        await self._stop_at_providers(unaccepted, "unaccepted")
        await self._stop_at_providers(overdue, "overdue")
        # Asked again now and then; the bucket lets replicas' copies de-duplicate.
        bucket = int(now.timestamp() // settings.stop_resend_s)
        await self._stop_at_providers(unconfirmed, f"resend-{bucket}")
        if unaccepted:
            self.wake.set()

    async def _stop_at_providers(self, stopped: list[Stopped], why: str) -> None:
        for s in stopped:
            cancel = TaskCancel(job_id=s.job_id, attempt=s.attempt)
            try:
                await self.js.publish(
                    subjects.tasks_subject(s.provider_id),
                    cancel.model_dump_json().encode(),
                    headers={"Nats-Msg-Id": subjects.msg_id(s.job_id, s.attempt, f"stop-{why}")},
                )
            except Exception as exc:
                # The unconfirmed-stop sweep asks again.
                log.warning("stop request not sent", extra={"job_id": s.job_id, "error": str(exc)})


async def consume(
    js: JetStreamContext,
    subject: str,
    durable: str,
    stream: str,
    handle: Callable[[list[Delivery]], Awaitable[None]],
    stop: asyncio.Event,
    linger: Linger | None = None,
) -> None:
    """Pulls from a durable consumer shared by every replica; acks after handling.

    A fetched batch is handled at once (one transaction for many events); if that fails,
    each message is tried alone, so one bad message is redelivered without the others.
    With `linger`, a small batch is followed by a short wait, so the next one is bigger.
    """
    sub = await js.pull_subscribe(subject, durable=durable, stream=stream)
    try:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(batch=FETCH_BATCH, timeout=1)
            except TimeoutError:  # nats.errors.TimeoutError or asyncio.TimeoutError
                continue
            except Exception as exc:
                log.warning("fetch failed; retrying", extra={"durable": durable, "error": str(exc)})
                await asyncio.sleep(1)
                continue
            try:
                await handle([_delivery(msg) for msg in msgs])
            except Exception:
                if len(msgs) == 1:
                    log.exception("handling failed; message will be redelivered")
                    await msgs[0].nak(delay=2)
                    continue
                log.warning("batch failed; handling its messages one by one", exc_info=True)
                for msg in msgs:
                    try:
                        await handle([_delivery(msg)])
                    except Exception:
                        log.exception("handling failed; message will be redelivered")
                        await msg.nak(delay=2)
                        continue
                    await msg.ack()
                continue
            for msg in msgs:
                await msg.ack()
            if linger is not None and linger.seconds > 0 and len(msgs) < linger.below:
                await wait_event(stop, linger.seconds)
    finally:
        # An open pull subscription makes drain() wait out its whole timeout.
        await sub.unsubscribe()


def health_app(scheduler_state: dict) -> FastAPI:
    app = FastAPI(title="scheduler", telemetry=NO_TELEMETRY)

    async def health() -> None:
        if not scheduler_state["nc"].is_connected:
            raise RuntimeError("NATS disconnected")
        await check_database(scheduler_state["engine"])

    install_common(app, "scheduler", health)
    return app


async def run(settings: SchedulerSettings) -> None:
    configure_logging("scheduler", settings.log_level)
    engine = make_engine(settings.database_url)
    sessionmaker = make_sessionmaker(engine)
    nc = await connect_nats(
        settings.nats_url,
        "scheduler",
        disconnected_cb=_on_disconnected,
        reconnected_cb=_on_reconnected,
    )
    js = nc.jetstream()
    await ensure_streams(js)
    scheduler = Scheduler(settings, nc, js, sessionmaker)

    async def on_capacity_changed(_: object) -> None:
        scheduler.wake.set()

    await nc.subscribe(subjects.CAPACITY_CHANGED, cb=on_capacity_changed)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = EmbeddedServer(
        uvicorn.Config(
            health_app({"nc": nc, "engine": engine}),
            host=settings.http_host,
            port=settings.http_port,
            log_config=None,
        )
    )
    settle_after_startup()
    log.info("scheduler started", extra={"allow_simulated": settings.simulated_allowed})
    registration = await register_in_consul(
        "scheduler", settings.advertise_port or settings.http_port
    )
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                consume(
                    js,
                    subjects.JOB_SUBMITTED,
                    subjects.SCHEDULER_DURABLE,
                    subjects.JOBS_STREAM,
                    scheduler.on_job_submitted,
                    stop,
                )
            )
            tg.create_task(
                consume(
                    js,
                    "events.>",
                    subjects.SCHEDULER_EVENTS_DURABLE,
                    subjects.EVENTS_STREAM,
                    scheduler.on_events,
                    stop,
                    Linger(below=EVENTS_LINGER_BELOW, seconds=settings.events_linger_s),
                )
            )
            tg.create_task(
                consume(
                    js,
                    subjects.PROVIDER_LOST_WILDCARD,
                    subjects.SCHEDULER_LOST_DURABLE,
                    subjects.PROVIDERS_STREAM,
                    scheduler.on_provider_lost,
                    stop,
                )
            )
            tg.create_task(scheduler.placement_loop(stop))
            tg.create_task(scheduler.lifecycle_loop(stop))
            tg.create_task(server.serve())
            await stop.wait()
            server.should_exit = True
            scheduler.wake.set()
    finally:
        if registration is not None:
            await registration.deregister()
        await nc.drain()
        await engine.dispose()
        log.info("scheduler stopped")


async def _on_disconnected() -> None:
    log.warning("NATS disconnected; reconnecting")


async def _on_reconnected() -> None:
    log.warning("NATS reconnected")


def main() -> None:
    run_on_uvloop(run(SchedulerSettings()))


if __name__ == "__main__":
    main()
