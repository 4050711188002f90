"""Heartbeat ingest in batches, and the liveness sweep that takes silent providers offline."""

import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import Counter, Gauge
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import async_sessionmaker

from common import subjects
from common.aio import wait_event
from common.messages import Heartbeat
from provider_registry import service
from provider_registry.settings import RegistrySettings

log = logging.getLogger(__name__)

HEARTBEATS = Counter("registry_heartbeats_total", "Heartbeats received", ["result"])
PROVIDERS_LOST = Counter("registry_providers_lost_total", "Providers that went offline")
FLUSH_BATCH = Gauge("registry_heartbeat_batch_size", "Heartbeats applied in the last flush")


class HeartbeatIngest:
    def __init__(
        self, nc: NATS, sessionmaker: async_sessionmaker, settings: RegistrySettings
    ) -> None:
        self.nc = nc
        self.sessionmaker = sessionmaker
        self.settings = settings
        # Only the newest heartbeat per provider matters; older ones are dropped.
        self.pending: dict[str, Heartbeat] = {}

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
        try:
            async with self.sessionmaker.begin() as session:
                revived = await service.ingest_heartbeats(session, batch)
        except Exception:
            # Kept for the next flush, unless a newer beat of the same provider came in.
            for beat in batch:
                self.pending.setdefault(beat.provider_id, beat)
            raise
        FLUSH_BATCH.set(len(batch))
        if revived:
            log.info("providers back online", extra={"provider_ids": revived})
            await self.nc.publish(subjects.CAPACITY_CHANGED, b"")

    async def sweep(self) -> None:
        async with self.sessionmaker.begin() as session:
            lost = await service.mark_silent_offline(session, self.settings.heartbeat_ttl_s)
        for provider_id in lost:
            PROVIDERS_LOST.inc()
            log.warning("provider missed heartbeats; offline", extra={"provider_id": provider_id})

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self.nc.subscribe(subjects.HEARTBEATS_WILDCARD, cb=self.on_message)
        ticks = 0
        try:
            while not stop.is_set():
                await wait_event(stop, self.settings.heartbeat_flush_interval_s)
                try:
                    await self.flush()
                    ticks += 1
                    if ticks % 5 == 0:
                        await self.sweep()
                except Exception:
                    log.exception("heartbeat flush failed; retrying next tick")
        finally:
            await sub.unsubscribe()
