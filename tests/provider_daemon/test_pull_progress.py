"""Image pull progress: the engines' streams folded into counts (recorded items, a fake
engine), then real pulls from a real registry through podman, reported on real NATS."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import nats
import pytest
from docker.errors import ImageNotFound, NotFound
from docker.utils import parse_repository_tag
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from common.messages import PullProgress, PullState
from common.subjects import job_pulls_filter
from provider_daemon.containers import PULL_REPORT_INTERVAL_S, Containers
from provider_daemon.errors import InfrastructureError
from provider_daemon.publisher import Publisher
from provider_daemon.pull_progress import PullFailed, PullTracker

# Podman 4.3.1's Docker-compatible API pulling a two-layer image whose base layer it
# already had (recorded here): the 400 MB layer tells its size once a second, the config
# blob comes last, and the last line repeats the config's id (the image id).
PODMAN_PULL: list[dict[str, Any]] = [
    {"status": "Already exists", "progressDetail": {}, "id": "3b737a7eea5d"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "53e4c7061708"},
    {
        "status": "Downloading",
        "progressDetail": {"current": 196534605, "total": 400035947},
        "progress": "[========================>                          ]  196.5MB/400MB",
        "id": "53e4c7061708",
    },
    {
        "status": "Downloading",
        "progressDetail": {"current": 374563149, "total": 400035947},
        "progress": "[==============================================>    ]  374.6MB/400MB",
        "id": "53e4c7061708",
    },
    {"status": "Download complete", "progressDetail": {}, "id": "53e4c7061708"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "8d7bf70b3635"},
    {"status": "Download complete", "progressDetail": {}, "id": "8d7bf70b3635"},
    {"status": "Download complete", "progressDetail": {}, "id": "8d7bf70b3635"},
]
# Podman answers a tag the registry doesn't have with 200 and this one item.
PODMAN_ERROR: dict[str, Any] = {
    "progressDetail": {},
    "errorDetail": {
        "message": "initializing source docker://127.0.0.1:53985/gpumarket/sample:nope: "
        "reading manifest nope in 127.0.0.1:53985/gpumarket/sample: manifest unknown: "
        "manifest unknown"
    },
    "error": "initializing source docker://127.0.0.1:53985/gpumarket/sample:nope: "
    "reading manifest nope in 127.0.0.1:53985/gpumarket/sample: manifest unknown: "
    "manifest unknown",
}
# Docker Engine pulling a three-layer image with one layer already there: a header whose
# id is the tag, download then extraction per layer, and id-less lines at the end.
DOCKER_PULL: list[dict[str, Any]] = [
    {"status": "Pulling from library/python", "id": "3.12-slim"},
    {"status": "Already exists", "progressDetail": {}, "id": "2d429b9e73a6"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "7a6f2c8b1d0e"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "c4e1b3d9a8f2"},
    {"status": "Waiting", "progressDetail": {}, "id": "c4e1b3d9a8f2"},
    {
        "status": "Downloading",
        "progressDetail": {"current": 1048576, "total": 3511772},
        "progress": "[==============>                                    ]  1.049MB/3.512MB",
        "id": "7a6f2c8b1d0e",
    },
    {
        "status": "Downloading",
        "progressDetail": {"current": 2097152, "total": 12845012},
        "progress": "[========>                                          ]  2.097MB/12.85MB",
        "id": "c4e1b3d9a8f2",
    },
    {"status": "Verifying Checksum", "progressDetail": {}, "id": "7a6f2c8b1d0e"},
    {"status": "Download complete", "progressDetail": {}, "id": "7a6f2c8b1d0e"},
    {
        "status": "Extracting",
        "progressDetail": {"current": 65536, "total": 3511772},
        "progress": "[>                                                  ]  65.54kB/3.512MB",
        "id": "7a6f2c8b1d0e",
    },
    {"status": "Pull complete", "progressDetail": {}, "id": "7a6f2c8b1d0e"},
    {"status": "Download complete", "progressDetail": {}, "id": "c4e1b3d9a8f2"},
    {
        "status": "Extracting",
        "progressDetail": {"current": 12845012, "total": 12845012},
        "progress": "[==================================================>]  12.85MB/12.85MB",
        "id": "c4e1b3d9a8f2",
    },
    {"status": "Pull complete", "progressDetail": {}, "id": "c4e1b3d9a8f2"},
    {"status": "Digest: sha256:" + "ab" * 32},
    {"status": "Status: Downloaded newer image for python:3.12-slim"},
]
# Docker reports a failure halfway through a pull inside the stream too.
DOCKER_ERROR: dict[str, Any] = {
    "errorDetail": {"message": "failed to register layer: no space left on device"},
    "error": "failed to register layer: no space left on device",
}


def counts(status: str, *numbers: int) -> PullState:
    """A PullState from (layers_done, layers_total, bytes_done, bytes_total)."""
    names = ("layers_done", "layers_total", "bytes_done", "bytes_total")
    return PullState.model_validate({"status": status, **dict(zip(names, numbers, strict=False))})


def states(items: list[dict[str, Any]]) -> list[PullState]:
    tracker = PullTracker()
    seen = []
    for item in items:
        tracker.feed(item)
        seen.append(tracker.state())
    return seen


class TestPullTracker:
    def test_podman_stream(self) -> None:
        seen = states(PODMAN_PULL)
        # The base layer is there; the new one has no size until its first "Downloading".
        assert seen[1] == counts("pulling", 1, 2, 0, 0)
        assert seen[2] == counts("pulling", 1, 2, 196534605, 400035947)
        assert seen[3] == counts("pulling", 1, 2, 374563149, 400035947)
        # Podman stores a layer as it downloads it: "Download complete" is the end of it.
        assert seen[4] == counts("pulling", 2, 2, 400035947, 400035947)
        # The config blob shows up as one more blob, until the last line names it.
        assert seen[6] == counts("pulling", 3, 3, 400035947, 400035947)
        assert seen[7] == counts("pulling", 2, 2, 400035947, 400035947)

    def test_docker_stream(self) -> None:
        seen = states(DOCKER_PULL)
        # The header's id is the tag, not a layer.
        assert seen[0] == counts("pulling", 0, 0, 0, 0)
        assert seen[3] == counts("pulling", 1, 3, 0, 0)
        assert seen[6] == counts("pulling", 1, 3, 1048576 + 2097152, 3511772 + 12845012)
        # Docker's "Download complete" is followed by extraction: not done yet, but
        # every byte is in, and extraction's progress is not counted as download.
        assert seen[8] == counts("pulling", 1, 3, 3511772 + 2097152, 3511772 + 12845012)
        assert seen[9] == seen[8]
        assert seen[10] == counts("pulling", 2, 3, 3511772 + 2097152, 3511772 + 12845012)
        assert seen[-1] == counts("pulling", 3, 3, 3511772 + 12845012, 3511772 + 12845012)

    def test_done_counts_everything_in(self) -> None:
        tracker = PullTracker()
        for item in PODMAN_PULL[:3]:
            tracker.feed(item)
        assert tracker.state("done") == counts("done", 2, 2, 400035947, 400035947)
        assert tracker.state("failed") == counts("failed", 1, 2, 196534605, 400035947)

    @pytest.mark.parametrize("item", [PODMAN_ERROR, DOCKER_ERROR], ids=["podman", "docker"])
    def test_error_item_raises_with_the_engines_words(self, item: dict[str, Any]) -> None:
        tracker = PullTracker()
        tracker.feed(DOCKER_PULL[0])
        with pytest.raises(PullFailed) as err:
            tracker.feed(item)
        assert str(err.value) == item["error"]

    def test_error_detail_alone_is_an_error(self) -> None:
        with pytest.raises(PullFailed, match="denied"):
            PullTracker().feed({"errorDetail": {"message": "denied"}})


class FakeEngine:
    """docker-py's DockerClient as far as ensure_image uses it: no image is local, and a
    pull answers with `items`, `delay_s` apart (or raises `error` at once)."""

    def __init__(
        self, items: list[dict[str, Any]], delay_s: float = 0.0, error: Exception | None = None
    ) -> None:
        self.items, self.delay_s, self.error = items, delay_s, error
        self.pulls: list[tuple[str, str | None]] = []
        self.images = SimpleNamespace(get=self._get)
        self.api = SimpleNamespace(pull=self._pull)

    def _get(self, name: str) -> SimpleNamespace:
        repository, tag = parse_repository_tag(name)
        if (repository, tag or "latest") not in self.pulls or self.error is not None:
            raise ImageNotFound(f"no such image: {name}")
        return SimpleNamespace(attrs={"Size": 1234, "Config": {"User": ""}})

    def _pull(
        self, repository: str, tag: str | None = None, stream: bool = False, decode: bool = False
    ) -> Iterator[dict[str, Any]]:
        assert stream and decode
        self.pulls.append((repository, tag))
        if self.error is not None:
            raise self.error

        def answer() -> Iterator[dict[str, Any]]:
            for item in self.items:
                time.sleep(self.delay_s)
                yield item

        return answer()


def faked(engine: FakeEngine) -> Containers:
    # Not through __init__, which asks a real engine for its API version.
    containers = Containers.__new__(Containers)
    containers.client, containers.docker_host = engine, "fake"  # type: ignore[assignment]
    containers._facts = {}
    return containers


class Recorder:
    def __init__(self) -> None:
        self.states: list[PullState] = []
        self.at: list[float] = []

    async def __call__(self, state: PullState) -> None:
        self.states.append(state)
        self.at.append(time.monotonic())


class TestImageFacts:
    async def test_inspected_once_then_remembered_until_removed(self) -> None:
        engine = FakeEngine(PODMAN_PULL)
        inspects: list[str] = []
        get = engine.images.get
        engine.images.get = lambda name: inspects.append(name) or get(name)
        containers = faked(engine)
        first = await containers.ensure_image("registry.example.com/app:1")
        assert first.pulled and inspects == ["registry.example.com/app:1"] * 2
        again = await containers.ensure_image("registry.example.com/app:1")
        assert not again.pulled and again.size_bytes == 1234 and len(inspects) == 2
        engine.images.remove = lambda name: None
        await containers.remove_image("registry.example.com/app:1")
        await containers.ensure_image("registry.example.com/app:1")
        assert len(inspects) == 3


class TestEnsureImageReports:
    async def test_reports_throttled_then_done(self) -> None:
        # 40 items over ~1 s: a report at once, then at most one per interval, then "done".
        items = [PODMAN_PULL[0], PODMAN_PULL[1]]
        items += [
            {
                "status": "Downloading",
                "progressDetail": {"current": i * 1000, "total": 40000},
                "id": "53e4c7061708",
            }
            for i in range(1, 39)
        ]
        items += [{"status": "Download complete", "progressDetail": {}, "id": "53e4c7061708"}]
        engine = FakeEngine(items, delay_s=0.025)
        report = Recorder()
        started = time.monotonic()
        await faked(engine).ensure_image("registry.example.com/team/app", report)
        elapsed = time.monotonic() - started

        assert engine.pulls == [("registry.example.com/team/app", "latest")]
        *pulling, last = report.states
        assert last == counts("done", 2, 2, 40000, 40000)
        assert {s.status for s in pulling} == {"pulling"}
        assert 2 <= len(pulling) <= 2 + elapsed / PULL_REPORT_INTERVAL_S
        gaps = [b - a for a, b in zip(report.at[:-2], report.at[1:-1], strict=True)]
        assert all(gap >= PULL_REPORT_INTERVAL_S * 0.9 for gap in gaps)
        assert [s.bytes_done for s in pulling] == sorted(s.bytes_done for s in pulling)

    async def test_error_item_is_infrastructure_and_reported_failed(self) -> None:
        engine = FakeEngine([*DOCKER_PULL[:6], DOCKER_ERROR, *DOCKER_PULL[6:]])
        report = Recorder()
        with pytest.raises(InfrastructureError, match="no space left on device"):
            await faked(engine).ensure_image("python:3.12-slim", report)
        assert engine.pulls == [("python", "3.12-slim")]
        assert report.states[-1] == counts("failed", 1, 3, 1048576, 3511772)
        assert all(s.status == "pulling" for s in report.states[:-1])

    async def test_refused_request_is_infrastructure_and_reported_failed(self) -> None:
        # Docker refuses an unknown repository with a 404 before any stream.
        engine = FakeEngine([], error=NotFound("pull access denied for nope"))
        report = Recorder()
        with pytest.raises(InfrastructureError, match="pull access denied"):
            await faked(engine).ensure_image("nope:1", report)
        assert report.states[-1] == counts("failed")

    async def test_without_a_reporter_pulls_quietly(self) -> None:
        # As the machine check calls it.
        engine = FakeEngine(PODMAN_PULL)
        await faked(engine).ensure_image("registry.example.com/app:1")
        assert engine.pulls == [("registry.example.com/app", "1")]
        with pytest.raises(InfrastructureError, match="manifest unknown"):
            await faked(FakeEngine([PODMAN_ERROR])).ensure_image("registry.example.com/app:2")

    async def test_a_failing_reporter_does_not_fail_the_pull(self) -> None:
        async def broken(state: PullState) -> None:
            raise RuntimeError("NATS is gone")

        await faked(FakeEngine(PODMAN_PULL)).ensure_image("registry.example.com/app:1", broken)


# --- real pulls: the registry, podman's API, NATS ------------------------------------


@pytest.fixture
async def nc(nats_server: Any) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.drain()


class Received:
    """PullProgress messages for one job, as a follower on NATS gets them."""

    def __init__(self) -> None:
        self.messages: list[PullProgress] = []
        self.over = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        progress = PullProgress.model_validate_json(msg.data)
        self.messages.append(progress)
        if progress.status != "pulling":
            self.over.set()


async def pull_reporting(
    nc: NatsClient, docker_host: str, image: str
) -> tuple[Received, InfrastructureError | None]:
    """ensure_image(image) reporting as a job attempt would, and what a follower got."""
    job_id, provider_id = str(uuid.uuid4()), uuid.uuid4().hex
    received = Received()
    await nc.subscribe(job_pulls_filter(job_id), cb=received.on_msg)
    publisher = Publisher(nc.jetstream(), provider_id, nc=nc)

    async def report(state: PullState) -> None:
        await publisher.pull_progress(
            PullProgress(job_id=job_id, attempt=0, image=image, **state.model_dump())
        )

    containers = Containers(docker_host)
    failure = None
    try:
        await containers.ensure_image(image, report)
    except InfrastructureError as exc:
        failure = exc
    finally:
        containers.close()
    await asyncio.wait_for(received.over.wait(), 10)
    assert {m.job_id for m in received.messages} == {job_id}
    return received, failure


class TestRealPull:
    async def test_pull_from_registry_reports_until_done(
        self, nc: NatsClient, podman_service: Any, registry_image: str
    ) -> None:
        received, failure = await pull_reporting(nc, podman_service.docker_host, registry_image)
        assert failure is None
        *pulling, last = received.messages
        assert pulling and {m.status for m in pulling} == {"pulling"}
        # The sample image's layer is local already; the fresh layer is downloaded.
        assert (last.status, last.layers_done, last.layers_total) == ("done", 2, 2)
        assert last.image == registry_image and last.attempt == 0
        client = podman_service.client()
        try:
            assert registry_image in client.images.get(registry_image).tags
        finally:
            client.close()

    async def test_missing_tag_fails_as_infrastructure(
        self, nc: NatsClient, podman_service: Any, image_registry: Any
    ) -> None:
        image = f"{image_registry.address}/tests/nothing-here:nope"
        received, failure = await pull_reporting(nc, podman_service.docker_host, image)
        assert failure is not None
        assert "manifest unknown" in str(failure) and image in str(failure)
        assert (received.messages[-1].status, received.messages[-1].image) == ("failed", image)
