"""Liveness end to end: real daemons, a real NATS server, the registry's heartbeat ingest
and a real PostgreSQL. A daemon killed with SIGKILL goes offline after the TTL and a
provider.lost event names the jobs it held; a NATS server restart loses no provider."""

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker

from common import subjects
from common.messages import ProviderLost
from common.streams import ensure_streams
from gpumarket.localstack.nats import NatsServer, start_nats
from gpumarket.localstack.process import free_port
from provider_daemon.config import ProviderConfig, save_config
from provider_daemon.gpus import SimulatedGpus
from provider_registry import service
from provider_registry.heartbeats import HeartbeatIngest
from provider_registry.models import OFFLINE, ONLINE, Provider, ProviderOutage
from provider_registry.schemas import ProviderRegistration
from provider_registry.settings import RegistrySettings
from tests.provider_daemon.conftest import FakeGateway, StartDaemon, until
from tests.provider_registry.factories import reserve_any

TTL_S = 3.0


class Registry:
    """The registry's background work in this event loop, on its own NATS connection."""

    def __init__(self, db: async_sessionmaker, url: str) -> None:
        self.db = db
        self.url = url
        self.ingest = HeartbeatIngest(
            db,
            RegistrySettings(
                dev_mode=True,
                heartbeat_ttl_s=TTL_S,
                heartbeat_flush_interval_s=0.1,
                liveness_sweep_interval_s=0.2,
            ),
        )
        self.stop = asyncio.Event()

    async def start(self) -> None:
        self.nc = await nats.connect(
            self.url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            disconnected_cb=self.ingest.on_disconnected,
            reconnected_cb=self.ingest.on_reconnected,
        )
        await ensure_streams(self.nc.jetstream())
        self.task = asyncio.create_task(self.ingest.run(self.nc, self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        await self.nc.close()

    async def register(self, provider_id: str, simulate: str, machine_id: str) -> None:
        inventory = SimulatedGpus(simulate, machine_id).inventory()
        async with self.db.begin() as session:
            await service.register_provider(
                session,
                ProviderRegistration(
                    provider_id=provider_id,
                    owner_id=str(uuid.uuid4()),
                    machine_id=machine_id,
                    name="m",
                    simulated=True,
                    gpus=[
                        {"uuid": g.uuid, "index": g.index, "model": g.model, "vram_mb": g.vram_mb}
                        for g in inventory.gpus
                    ],
                ),
            )

    async def provider(self, provider_id: str) -> Provider:
        async with self.db() as session:
            found = await session.get(Provider, provider_id)
            assert found is not None
            return found


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A NATS server of this test's own, so it can be restarted."""
    server = start_nats(tmp_path / "nats", port=free_port())
    yield server
    server.stop()


@pytest.fixture
async def registry(db: async_sessionmaker, own_nats: NatsServer) -> AsyncIterator[Registry]:
    reg = Registry(db, own_nats.url)
    await reg.start()
    yield reg
    await reg.close()


async def wait_for(check: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def spawn_daemon(config_path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "provider_daemon", "run", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_killed_daemon_goes_offline_after_the_ttl_and_provider_lost_names_its_jobs(
    registry: Registry,
    gateway: FakeGateway,
    podman_service: Any,
    sample_image: str,
    tmp_path: Path,
) -> None:
    provider_id, machine_id = str(uuid.uuid4()), str(uuid.uuid4())
    config_path = tmp_path / "provider.json"
    save_config(
        ProviderConfig(
            api_url=gateway.url,
            machine_id=machine_id,
            name="m",
            simulate="RTX 4090:2",
            check_image=sample_image,
            work_dir=tmp_path / "work",
            docker_host=podman_service.docker_host,
            provider_id=provider_id,
            credential=gateway.credential,
            nats_url=registry.url,
            heartbeat_interval_s=0.3,
        ),
        config_path,
    )
    lost: list[ProviderLost] = []

    async def on_lost(msg: Any) -> None:
        lost.append(ProviderLost.model_validate_json(msg.data))

    beats: list[Any] = []

    async def on_beat(msg: Any) -> None:
        beats.append(msg)

    watcher = await nats.connect(registry.url)
    await watcher.subscribe(subjects.provider_lost_subject(provider_id), cb=on_lost)
    await watcher.subscribe(subjects.heartbeat_subject(provider_id), cb=on_beat)
    daemon = spawn_daemon(config_path)
    try:
        # Registered once it beats, as a join would have done just before: its start-up
        # (the machine check) must not count against a TTL this short.
        await until(lambda: bool(beats), 60, "the first heartbeat")
        since = time.time()
        await registry.register(provider_id, "RTX 4090:2", machine_id)

        async def beating() -> bool:
            p = await registry.provider(provider_id)
            return p.last_heartbeat_at is not None and p.last_heartbeat_at.timestamp() > since

        await wait_for(beating, 60, "heartbeats")
        held: list[Any] = []

        async def reserved() -> bool:
            # SKIP LOCKED: a heartbeat batch holding the GPU rows (every 0.3 s here)
            # makes a reservation find none for that moment.
            async with registry.db.begin() as session:
                held.append(await reserve_any(session, "job-held"))
            return held[-1] is not None

        await wait_for(reserved, 10, "a reservation")
        assert held[-1].provider_id == provider_id

        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        killed_at = time.monotonic()

        async def offline() -> bool:
            return (await registry.provider(provider_id)).state == OFFLINE

        await wait_for(offline, TTL_S + 10, "offline")
        # Not before the TTL: a beat or two missed is not a lost machine.
        assert time.monotonic() - killed_at >= TTL_S - 0.5
        await until(lambda: bool(lost), 10, "provider.lost")
        assert lost[0].provider_id == provider_id and lost[0].job_ids == ["job-held"]
        # In the stream too, for a scheduler that was down at the time.
        stored = await watcher.jetstream().get_last_msg(
            subjects.PROVIDERS_STREAM, subjects.provider_lost_subject(provider_id)
        )
        assert ProviderLost.model_validate_json(stored.data).job_ids == ["job-held"]

        # Back by itself when its heartbeats return; the outage closes.
        daemon = spawn_daemon(config_path)

        async def online() -> bool:
            return (await registry.provider(provider_id)).state == ONLINE

        await wait_for(online, 60, "back online")
        async with registry.db() as session:
            outage = await session.scalar(select(ProviderOutage))
        assert outage is not None and outage.ended_at is not None and outage.lost_published
        assert len(lost) == 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        await watcher.close()


async def test_a_nats_restart_during_heartbeats_loses_no_provider(
    registry: Registry, own_nats: NatsServer, start_daemon: StartDaemon
) -> None:
    client = await nats.connect(own_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    daemons = []
    for _ in range(4):
        provider_id = str(uuid.uuid4())
        running = await start_daemon(
            simulate="L4:1", provider_id=provider_id, nats_client=client, reconnect_wait_s=0.2
        )
        await registry.register(provider_id, "L4:1", running.config.machine_id)
        daemons.append(running)

    async def all_fresh(since: float) -> bool:
        async with registry.db() as session:
            beats = (
                await session.execute(
                    select(Provider.state, func.extract("epoch", Provider.last_heartbeat_at))
                )
            ).all()
        return len(beats) == 4 and all(s == ONLINE and at > since for s, at in beats)

    first = time.time()
    await wait_for(lambda: all_fresh(first), 30, "heartbeats")
    own_nats.stop()
    await asyncio.sleep(1.0)
    restarted = start_nats(own_nats.data_dir, port=own_nats.port)
    own_nats.proc = restarted.proc
    own_nats.monitor_port = restarted.monitor_port
    back = time.time()
    await wait_for(lambda: all_fresh(back), 30, "heartbeats after the restart")
    # And well past a TTL later, still nobody lost.
    await asyncio.sleep(TTL_S + 1)
    assert await all_fresh(back)
    async with registry.db() as session:
        assert await session.scalar(select(func.count()).select_from(ProviderOutage)) == 0
    await client.close()
