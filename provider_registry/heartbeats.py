"""The registry's background work: heartbeats ingested in batches, silent providers
taken offline with a provider.lost event, reliability and fleet metrics refreshed."""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from prometheus_client import Counter, Gauge, Histogram
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker

from common import subjects
from common.aio import wait_event
from common.messages import Heartbeat
from provider_registry import fleet_metrics, liveness, reliability
from provider_registry.settings import RegistrySettings

log = logging.getLogger(__name__)

HEARTBEATS = Counter("registry_heartbeats_total", "Heartbeats received", ["result"])
PROVIDERS_LOST = Counter("registry_providers_lost_total", "Providers that went offline")
FLUSH_BATCH = Gauge("registry_heartbeat_batch_size", "Heartbeats applied in the last flush")
FLUSH_SECONDS = Histogram(
    "registry_heartbeat_flush_seconds", "Seconds one batch of heartbeats took to commit"
)
# From the daemon's send time to the commit that applied it (daemon clocks may skew;
# on one machine, as in `gpumarket bench heartbeats`, it is exact).
INGEST_LAG = Histogram(
    "registry_heartbeat_ingest_lag_seconds",
    "Seconds from a heartbeat's send time to its commit in Postgres",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
)


class HeartbeatIngest:
    def __init__(self, sessionmaker: async_sessionmaker, settings: RegistrySettings) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.nc: NATS | None = None
        # Only the newest heartbeat per provider matters; older ones are dropped.
        self.pending: dict[str, Heartbeat] = {}
        # While we hear nothing, silence proves nothing: no provider is declared lost
        # until we have listened for a whole TTL (after start, after a NATS outage).
        self.listening_since: float | None = None
        self.fleet = fleet_metrics.fleet_collector()

    # --- NATS connection callbacks ---------------------------------------------------

    async def on_disconnected(self) -> None:
        if self.listening_since is not None:
            log.warning("NATS connection lost; no provider is declared lost meanwhile")
        self.listening_since = None

    async def on_reconnected(self) -> None:
        log.info("NATS reconnected; liveness checks resume after one TTL")
        self.listening_since = time.monotonic()

    # --- heartbeats ------------------------------------------------------------------

    async def on_message(self, msg: Msg) -> None:
        try:
            beat = Heartbeat.model_validate_json(msg.data)
        except ValidationError:
            HEARTBEATS.labels("invalid").inc()
            return
        if msg.subject != subjects.heartbeat_subject(beat.provider_id):
            HEARTBEATS.labels("wrong_subject").inc()  # a daemon speaking for another
            return
        HEARTBEATS.labels("ok").inc()
        self.pending[beat.provider_id] = beat

    async def flush(self) -> None:
        batch, self.pending = list(self.pending.values()), {}
        if not batch:
            return
        started = time.perf_counter()
        try:
            async with self.sessionmaker.begin() as session:
                revived = await liveness.ingest_heartbeats(session, batch)
        except Exception:
            # Kept for the next flush, unless a newer beat of the same provider came in.
            for beat in batch:
                self.pending.setdefault(beat.provider_id, beat)
            raise
        FLUSH_SECONDS.observe(time.perf_counter() - started)
        FLUSH_BATCH.set(len(batch))
        now = time.time()
        for beat in batch:
            INGEST_LAG.observe(max(0.0, now - beat.at.timestamp()))
        if revived:
            log.info("providers back online", extra={"provider_ids": revived})
            if self.nc is not None:
                await self.nc.publish(subjects.CAPACITY_CHANGED, b"")

    # --- liveness --------------------------------------------------------------------

    def may_declare_lost(self) -> bool:
        since = self.listening_since
        return since is not None and time.monotonic() - since >= self.settings.heartbeat_ttl_s

    async def sweep(self) -> None:
        """Takes silent providers offline, then publishes every unpublished loss."""
        if self.may_declare_lost():
            async with self.sessionmaker.begin() as session:
                lost = await liveness.mark_silent_offline(session, self.settings.heartbeat_ttl_s)
            for provider_id in lost:
                PROVIDERS_LOST.inc()
                log.warning(
                    "provider missed heartbeats; offline", extra={"provider_id": provider_id}
                )
        await self.publish_losses()

    async def publish_losses(self) -> None:
        """The outbox: an outage whose provider.lost did not reach JetStream is sent again
        next sweep; the Nats-Msg-Id keeps a resend within the window from doubling."""
        if self.nc is None or not self.nc.is_connected:
            return
        js = self.nc.jetstream()
        async with self.sessionmaker.begin() as session:
            pending = await liveness.unpublished_losses(session)
            published: list[int] = []
            for lost in pending:
                try:
                    await js.publish(
                        subjects.provider_lost_subject(lost.event.provider_id),
                        lost.event.model_dump_json().encode(),
                        timeout=5.0,
                        headers={"Nats-Msg-Id": f"provider-lost:{lost.outage_id}"},
                    )
                except (NatsError, TimeoutError) as exc:
                    log.warning("provider.lost not published yet (%s); retrying", exc)
                    break
                published.append(lost.outage_id)
            await liveness.mark_published(session, published)

    async def refresh(self) -> None:
        async with self.sessionmaker.begin() as session:
            await reliability.recompute(session, self.settings.reliability_window_days)

    async def refresh_fleet_metrics(self) -> None:
        async with self.sessionmaker() as session:
            self.fleet.snapshot = await fleet_metrics.read_snapshot(session)

    # --- loops -----------------------------------------------------------------------

    async def run(self, nc: NATS, stop: asyncio.Event) -> None:
        self.nc = nc
        sub = await nc.subscribe(
            subjects.HEARTBEATS_WILDCARD, queue=subjects.HEARTBEATS_QUEUE, cb=self.on_message
        )
        self.listening_since = time.monotonic()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    self._every(self.settings.heartbeat_flush_interval_s, self.flush, stop)
                )
                tg.create_task(
                    self._every(self.settings.liveness_sweep_interval_s, self.sweep, stop)
                )
                tg.create_task(
                    self._every(self.settings.reliability_interval_s, self.refresh, stop)
                )
                tg.create_task(
                    self._every(
                        self.settings.fleet_metrics_interval_s, self.refresh_fleet_metrics, stop
                    )
                )
        finally:
            await self.flush_quietly()
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def flush_quietly(self) -> None:
        try:
            await self.flush()
        except Exception:
            log.exception("last heartbeat flush failed")

    @staticmethod
    async def _every(
        interval_s: float, work: Callable[[], Awaitable[None]], stop: asyncio.Event
    ) -> None:
        """Runs `work` every interval until stopped; a failure is logged, not fatal."""
        while not await wait_event(stop, interval_s):
            try:
                await work()
            except Exception:
                log.exception("%s failed; retrying next time", work.__name__)
