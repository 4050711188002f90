"""Fixtures for the daemon's tests: a test double of the gateway's agent API (a real HTTP
server), a JetStream connection, and a daemon running in the test's event loop."""

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import nats
import pytest
import uvicorn
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.messages import Heartbeat, JobEvent, LogBatch, TaskAssignment, TaskCancel
from common.streams import ensure_streams
from common.subjects import provider_durable, tasks_subject
from gpumarket.localstack.process import free_port
from provider_daemon.config import ProviderConfig
from provider_daemon.containers import LABEL_PROVIDER
from provider_daemon.daemon import Daemon, Tuning
from provider_daemon.gpus import SimulatedGpus
from provider_daemon.policy import ContainerPolicy


class QuietServer(uvicorn.Server):
    """uvicorn in the test's event loop, leaving signals to pytest."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: Starlette, what: str) -> AsyncIterator[str]:
    """Serves `app` on a free loopback port in this event loop; yields its URL."""
    port = free_port()
    server = QuietServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started, 10, what)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class FakeGateway:
    """What the gateway and the object store do for a daemon, recorded for assertions."""

    url: str = ""
    nats_url: str = ""
    credential: str = field(default_factory=lambda: secrets.token_hex(8))
    inputs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    uploads: dict[tuple[str, int, str], bytes] = field(default_factory=dict)
    upload_lengths: dict[tuple[str, int, str], str | None] = field(default_factory=dict)
    logs: dict[tuple[str, int], bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    joins: list[dict[str, Any]] = field(default_factory=list)
    # Credentials the platform no longer accepts (revoked, or the machine left).
    revoked: set[str] = field(default_factory=set)
    # Credentials whose owner is disabled (accepted again once enabled).
    owner_disabled: set[str] = field(default_factory=set)

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.credential}"

    async def join(self, request: Request) -> Response:
        body = await request.json()
        self.joins.append(body)
        if body["token"] == "expired-token":
            return JSONResponse({"detail": "join token expired"}, status_code=403)
        return JSONResponse(
            {
                "provider_id": uuid.uuid4().hex,
                "credential": self.credential,
                "nats_url": self.nats_url,
                "heartbeat_interval_s": 0.3,
            },
            status_code=201,
        )

    async def provider_status(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        if token in self.revoked or not token:
            return JSONResponse({"detail": "credential revoked"}, status_code=401)
        if token in self.owner_disabled:
            detail = "the machine's owner account is disabled"
            return JSONResponse({"detail": detail}, status_code=401)
        return JSONResponse(
            {"provider": {"id": "p"}, "running_tasks": [], "tasks_ended": 0, "earned": "0"}
        )

    async def list_inputs(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"detail": "bad credential"}, status_code=401)
        job_id = request.path_params["job_id"]
        assert request.query_params["attempt"].isdigit()
        files = self.inputs.get(job_id, {})
        return JSONResponse(
            [
                {
                    "file_id": f"file-{i}",
                    "path": path,
                    "size": len(content),
                    "download_url": f"{self.url}/objects/{job_id}/{i}",
                }
                for i, (path, content) in enumerate(files.items())
            ]
        )

    async def download(self, request: Request) -> Response:
        # Presigned URLs carry their own signature: no credential may be sent here.
        assert "authorization" not in request.headers
        files = list(self.inputs[request.path_params["job_id"]].values())
        return Response(files[int(request.path_params["index"])])

    async def plan_outputs(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"detail": "bad credential"}, status_code=401)
        job_id = request.path_params["job_id"]
        body = await request.json()
        attempt = body["attempt"]
        self.manifests[(job_id, attempt)] = body["files"]
        base = f"{self.url}/put/{job_id}/{attempt}"
        return JSONResponse(
            {
                "uploads": [
                    {
                        "path": f["path"],
                        "upload_url": f"{base}/{f['path']}",
                    }
                    for f in body["files"]
                ],
                "log_upload_url": f"{self.url}/putlog/{job_id}/{attempt}",
            }
        )

    async def put_object(self, request: Request) -> Response:
        assert "authorization" not in request.headers
        p = request.path_params
        key = (p["job_id"], int(p["attempt"]), p["path"])
        self.upload_lengths[key] = request.headers.get("content-length")
        self.uploads[key] = await request.body()
        return Response(status_code=200)

    async def put_log(self, request: Request) -> Response:
        p = request.path_params
        self.logs[(p["job_id"], int(p["attempt"]))] = await request.body()
        return Response(status_code=200)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/providers/join", self.join, methods=["POST"]),
                Route("/v1/agent/provider", self.provider_status),
                Route("/v1/agent/jobs/{job_id}/inputs", self.list_inputs),
                Route("/v1/agent/jobs/{job_id}/outputs", self.plan_outputs, methods=["POST"]),
                Route("/objects/{job_id}/{index:int}", self.download),
                Route("/put/{job_id}/{attempt}/{path:path}", self.put_object, methods=["PUT"]),
                Route("/putlog/{job_id}/{attempt}", self.put_log, methods=["PUT"]),
            ]
        )


@pytest.fixture(scope="session")
async def gateway(nats_server: Any) -> AsyncIterator[FakeGateway]:
    fake = FakeGateway(nats_url=nats_server.url)
    async with serving(fake.app(), "the fake gateway") as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="session")
async def nc(nats_server: Any) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_server.url)
    await ensure_streams(client.jetstream())
    yield client
    await client.drain()


@pytest.fixture(scope="session")
def docker_client(podman_service: Any) -> Iterator[docker.DockerClient]:
    client = docker.DockerClient(base_url=podman_service.docker_host, timeout=60)
    yield client
    client.close()


async def until(check: Callable[[], bool], within: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class RunningDaemon:
    """A daemon in this event loop, with everything it published collected."""

    daemon: Daemon
    config: ProviderConfig
    js: JetStreamContext
    stop_event: asyncio.Event
    task: asyncio.Task[None]
    events: list[JobEvent] = field(default_factory=list)
    log_batches: list[LogBatch] = field(default_factory=list)
    heartbeats: list[Heartbeat] = field(default_factory=list)
    subscriptions: list[Any] = field(default_factory=list)

    @property
    def provider_id(self) -> str:
        return self.config.provider_id

    @property
    def gpu_uuids(self) -> list[str]:
        return [g.uuid for g in self.daemon.inventory.gpus]

    def task_for(self, command: list[str], **fields: Any) -> TaskAssignment:
        values: dict[str, Any] = {
            "job_id": f"job-{uuid.uuid4().hex[:12]}",
            "attempt": 1,
            "image": "localhost/gpumarket-sample:latest",
            "command": command,
            "gpu_uuids": self.gpu_uuids[:1],
            "max_duration_s": 60,
        }
        values.update(fields)
        return TaskAssignment(**values)

    async def send(self, message: TaskAssignment | TaskCancel) -> None:
        await self.js.publish(tasks_subject(self.provider_id), message.model_dump_json().encode())

    def events_of(self, job_id: str) -> list[JobEvent]:
        return [e for e in self.events if e.job_id == job_id]

    def types_of(self, job_id: str) -> list[str]:
        return [e.type for e in self.events_of(job_id)]

    async def finished(self, job_id: str, within: float = 60.0) -> JobEvent:
        await until(lambda: "finished" in self.types_of(job_id), within, f"{job_id} finished")
        return next(e for e in self.events_of(job_id) if e.type == "finished")

    def log_lines(self, job_id: str) -> list[str]:
        batches = sorted((b for b in self.log_batches if b.job_id == job_id), key=lambda b: b.seq)
        return [line for b in batches for line in b.lines]

    async def all_tasks_handled(self) -> None:
        """Waits until the daemon's consumer has no message pending or unacked."""

        def settled(info: Any) -> bool:
            return info.num_pending == 0 and info.num_ack_pending == 0

        deadline = time.monotonic() + 30
        while True:
            info = await self.js.consumer_info("TASKS", provider_durable(self.provider_id))
            if settled(info):
                return
            assert time.monotonic() < deadline, "task messages not handled"
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 60)


StartDaemon = Callable[..., Awaitable[RunningDaemon]]


@pytest.fixture
async def start_daemon(
    nc: NatsClient,
    gateway: FakeGateway,
    podman_service: Any,
    sample_image: str,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> AsyncIterator[StartDaemon]:
    started: list[RunningDaemon] = []

    async def start(
        simulate: str = "RTX 4090:2",
        provider_id: str | None = None,
        metrics_port: int | None = None,
        nats_client: NatsClient | None = None,
        credential: str | None = None,
        policy: ContainerPolicy | None = None,
        memory_mb: int | None = None,
        machine_id: str | None = None,
        **tuning: Any,
    ) -> RunningDaemon:
        """A daemon on `nats_client`'s server (the session's by default)."""
        client = nats_client or nc
        config = ProviderConfig(
            api_url=gateway.url,
            machine_id=machine_id or str(uuid.uuid4()),
            name="test-machine",
            simulate=simulate,
            work_dir=tmp_path / "work",
            docker_host=podman_service.docker_host,
            provider_id=provider_id or uuid.uuid4().hex,
            credential=credential or gateway.credential,
            check_image=sample_image,
            nats_url=client.connected_url.geturl() if client.connected_url else "",
            heartbeat_interval_s=0.3,
            policy=policy or ContainerPolicy(),
            memory_mb=memory_mb,
        )
        daemon = Daemon(
            config,
            SimulatedGpus(simulate, config.machine_id),
            metrics_port=metrics_port,
            tuning=Tuning(**{"fetch_timeout_s": 1.0, "stop_grace_s": 1.0, **tuning}),
        )
        pid = config.provider_id
        stop = asyncio.Event()
        events: list[JobEvent] = []
        log_batches: list[LogBatch] = []
        heartbeats: list[Heartbeat] = []
        # Events and logs share one subscription: nats-py runs each subscription's
        # callbacks in its own task, so with two a `finished` could be seen before the
        # log batches the daemon published ahead of it.
        job_messages = _router(
            events=_collector(events, JobEvent), logs=_collector(log_batches, LogBatch)
        )
        subscriptions = [
            await client.subscribe(f"*.{pid}.>", cb=job_messages),
            await client.subscribe(f"heartbeats.{pid}", cb=_collector(heartbeats, Heartbeat)),
        ]
        running = RunningDaemon(
            daemon,
            config,
            client.jetstream(),
            stop,
            asyncio.create_task(daemon.run(stop)),
            events,
            log_batches,
            heartbeats,
            subscriptions,
        )
        started.append(running)
        # Ready once it beats; by then its task consumer exists too (same startup path).
        await until(lambda: bool(running.heartbeats) or running.task.done(), 30, "heartbeat")
        if running.task.done():
            running.task.result()
        await until(lambda: daemon_consumer_ready(running), 30, "task consumer")
        return running

    yield start

    for running in started:
        if not running.task.done():
            await running.stop()
        for sub in running.subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        left = docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_PROVIDER}={running.provider_id}"}
        )
        for container in left:
            container.remove(force=True)
        assert not left, "the daemon left containers behind"


def daemon_consumer_ready(running: RunningDaemon) -> bool:
    return running.daemon.subscribed


def _collector(into: list[Any], model: Any) -> Callable[[Msg], Awaitable[None]]:
    async def collect(msg: Msg) -> None:
        into.append(model.model_validate_json(msg.data))

    return collect


def _router(**by_kind: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
    """One callback for several subjects, chosen by the subject's first token."""

    async def route(msg: Msg) -> None:
        handle = by_kind.get(msg.subject.partition(".")[0])
        if handle is not None:
            await handle(msg)

    return route
