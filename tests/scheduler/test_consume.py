"""The scheduler's consumer loop against a real JetStream: a small batch is followed by a
wait that collects what comes next into one batch; a big one is not; stop ends a wait."""

import asyncio
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from gpumarket.localstack.nats import NatsServer
from scheduler.worker import Delivery, Linger, consume


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc: NatsClient = await nats.connect(nats_server.url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


class Stream:
    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.name = f"consume_{uuid.uuid4().hex[:12]}"
        self.subject = f"{self.name}.events"
        self.batches: list[list[bytes]] = []
        self.handled = asyncio.Event()

    async def create(self) -> "Stream":
        await self.js.add_stream(name=self.name, subjects=[self.subject])
        return self

    async def publish(self, *payloads: bytes, spaced_s: float = 0.0) -> None:
        for payload in payloads:
            await self.js.publish(self.subject, payload)
            await asyncio.sleep(spaced_s)

    async def handle(self, batch: list[Delivery]) -> None:
        self.batches.append([d.data for d in batch])
        self.handled.set()

    def consume(self, stop: asyncio.Event, linger: Linger | None) -> "asyncio.Task[None]":
        return asyncio.create_task(
            consume(self.js, self.subject, "scheduler", self.name, self.handle, stop, linger)
        )

    async def handled_count(self, count: int) -> None:
        while sum(len(b) for b in self.batches) < count:
            self.handled.clear()
            await asyncio.wait_for(self.handled.wait(), 10)


async def first_then_later(
    js: JetStreamContext, linger: Linger | None, later: int, spaced_s: float
) -> list[list[bytes]]:
    """The batches handled: one event, then `later` more arriving one by one, `spaced_s`
    apart, from the moment the first was handled."""
    stream = await Stream(js).create()
    stop = asyncio.Event()
    consuming = stream.consume(stop, linger)
    try:
        await stream.publish(b"first")
        await stream.handled_count(1)
        await stream.publish(*(f"later-{i}".encode() for i in range(later)), spaced_s=spaced_s)
        await stream.handled_count(1 + later)
    finally:
        stop.set()
        await asyncio.wait_for(consuming, 10)
    return stream.batches


async def test_events_after_a_small_batch_come_in_one_batch(js: JetStreamContext) -> None:
    # They arrive while the replica waits after its batch of one.
    batches = await first_then_later(js, Linger(below=8, seconds=1.0), 5, spaced_s=0.02)
    assert batches == [[b"first"], [f"later-{i}".encode() for i in range(5)]]


async def test_without_linger_each_event_is_its_own_batch(js: JetStreamContext) -> None:
    """What the linger is for: the same arrivals, fetched as soon as the replica is free."""
    batches = await first_then_later(js, None, 3, spaced_s=0.5)
    assert len(batches) == 4


async def test_a_full_batch_is_followed_by_no_wait(js: JetStreamContext) -> None:
    stream = await Stream(js).create()
    await stream.publish(b"a", b"b")
    stop = asyncio.Event()
    # A wait after this batch would outlast the test's own 10 s limits.
    consuming = stream.consume(stop, Linger(below=2, seconds=600))
    try:
        await stream.handled_count(2)
        await stream.publish(b"c")
        await stream.handled_count(3)
    finally:
        stop.set()
    assert stream.batches[0] == [b"a", b"b"]
    # The wait after the batch of one ends on stop.
    await asyncio.wait_for(consuming, 10)
