"""The container engine (Docker, or Podman's Docker-compatible API) through docker-py.

docker-py blocks, so every call runs off the event loop: short calls through
asyncio.to_thread, and those that may last long (image pulls, wait, log streaming) on
their own daemon threads, so several jobs cannot starve the default executor and a
stuck stream cannot hold up the process's exit.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import DeviceRequest, Ulimit
from docker.utils import parse_repository_tag

from common.messages import PullState
from provider_daemon.errors import DaemonError, InfrastructureError
from provider_daemon.policy import NOBODY, Limits
from provider_daemon.pull_progress import PullTracker

log = logging.getLogger(__name__)

T = TypeVar("T")
# Receives a pull's progress; called from the event loop, one call at a time.
PullReporter = Callable[[PullState], Awaitable[None]]
# Progress reports go out at most this often while pulling (plus the final one).
PULL_REPORT_INTERVAL_S = 0.5
# How long an image's inspected size and user are reused: an image removed or retagged
# on the machine meanwhile is seen at the latest this much later.
IMAGE_FACTS_TTL_S = 30.0

LABEL_JOB = "gpumarket.job_id"
LABEL_ATTEMPT = "gpumarket.attempt"
LABEL_PROVIDER = "gpumarket.provider_id"
# Marks the short-lived containers of the machine check (provider_daemon.preflight).
LABEL_PREFLIGHT = "gpumarket.preflight"
DEFAULT_PIDS_LIMIT = 4096
DEFAULT_TMP_SIZE_MB = 1024


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    inputs_dir: Path
    outputs_dir: Path
    gpu_uuids: list[str]
    # Simulated GPUs have no device to hand to the container.
    real_gpus: bool
    limits: Limits
    # "uid:gid", or None for the image's own user.
    user: str | None = NOBODY
    # Outbound network through the engine's default bridge; otherwise none at all.
    network: bool = False
    runtime: str | None = None
    tmp_size_mb: int = DEFAULT_TMP_SIZE_MB
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageFacts:
    """What the daemon needs to know of an image before running it."""

    size_bytes: int
    # The image's USER ("" for root by default).
    user: str
    # Pulled for this job (rather than found on the machine).
    pulled: bool = False


def explain(exc: Exception) -> str:
    """The engine's own words, without docker-py's URL-laden prefix."""
    text = getattr(exc, "explanation", None) or str(exc) or type(exc).__name__
    return str(text).strip()


def hardening(
    pids_limit: int = DEFAULT_PIDS_LIMIT, tmp_size_mb: int = DEFAULT_TMP_SIZE_MB
) -> dict[str, Any]:
    """containers.create() arguments every container of ours gets, jobs and checks alike."""
    return {
        # A stranger's code on the owner's machine: no network, no privileges, nothing
        # written outside /tmp (memory, sized) and the job's own /outputs.
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "read_only": True,
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={tmp_size_mb}m,mode=1777"},
        # Podman on hosts without systemd refuses containers without explicit ulimits.
        "ulimits": [
            Ulimit(name="nofile", soft=1024, hard=1024),
            Ulimit(name="nproc", soft=1024, hard=1024),
        ],
        "pids_limit": pids_limit,
    }


def gpu_requests(
    engine: str | None, gpu_uuids: list[str], capabilities: list[str]
) -> list[DeviceRequest]:
    """Hands exactly these NVIDIA GPUs (by UUID) to a container: Docker's NVIDIA device
    driver, or CDI names for Podman, whose Docker-compatible API takes only those (its
    device requests with the "cdi" driver become `--device nvidia.com/gpu=<uuid>`)."""
    if engine is not None and engine.lower().startswith("podman"):
        return [DeviceRequest(driver="cdi", device_ids=[cdi_name(u) for u in gpu_uuids])]
    return [DeviceRequest(driver="nvidia", device_ids=gpu_uuids, capabilities=[capabilities])]


def cdi_name(gpu_uuid: str) -> str:
    return f"nvidia.com/gpu={gpu_uuid}"


def _in_thread(fn: Callable[[], T]) -> "asyncio.Future[T]":
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, daemon=True, name="docker-long-call").start()
    return future


async def _report(report: PullReporter | None, state: PullState) -> None:
    # Progress is a courtesy to the requester: failing to send it must not fail the pull.
    if report is None:
        return
    try:
        await report(state)
    except Exception:
        log.warning("could not report pull progress", exc_info=True)


class Containers:
    def __init__(self, docker_host: str, timeout_s: float = 120.0) -> None:
        try:
            self.client = docker.DockerClient(
                base_url=docker_host, timeout=int(timeout_s), max_pool_size=64
            )
        except DockerException as exc:
            raise DaemonError(
                f"cannot reach the container engine at {docker_host}: {explain(exc)}"
            ) from None
        self.docker_host = docker_host
        # "Podman 4.3.1" or "Docker 27.3.1" once engine_version() was asked (the machine
        # check does, first thing): how GPUs are handed to containers depends on it.
        self.engine: str | None = None
        # What a recent inspect said of an image by reference: a machine runs the same
        # image job after job, and each inspect costs the engine CPU the jobs need.
        self._facts: dict[str, tuple[float, ImageFacts]] = {}

    def close(self) -> None:
        self.client.close()

    async def ensure_image(self, image: str, report: PullReporter | None = None) -> ImageFacts:
        """Uses the local image, else pulls it, telling `report` how far it got (at most
        every PULL_REPORT_INTERVAL_S, then "done" or "failed"); a failure is the
        infrastructure's."""
        known = self._facts.get(image)
        if known is not None and known[0] > time.monotonic():
            return known[1]
        try:
            return self._remember(image, await self.image_facts(image))
        except ImageNotFound:
            pass
        except Exception as exc:
            raise InfrastructureError(f"inspecting image {image!r}: {explain(exc)}") from None
        repository, tag = parse_repository_tag(image)
        tracker = PullTracker()
        try:
            # A tag is always given: without one the engine would pull every tag.
            await self._pull(repository, tag or "latest", tracker, report)
        except Exception as exc:
            await _report(report, tracker.state("failed"))
            raise InfrastructureError(
                f"image {image!r} is not on this machine and pulling it failed: {explain(exc)}"
            ) from None
        await _report(report, tracker.state("done"))
        try:
            return replace(self._remember(image, await self.image_facts(image)), pulled=True)
        except Exception as exc:
            raise InfrastructureError(f"inspecting image {image!r}: {explain(exc)}") from None

    async def image_facts(self, image: str) -> ImageFacts:
        """Raises ImageNotFound when the engine has no such image."""
        attrs: dict[str, Any] = (await asyncio.to_thread(self.client.images.get, image)).attrs
        config = attrs.get("Config") or {}
        return ImageFacts(size_bytes=int(attrs.get("Size") or 0), user=config.get("User") or "")

    def _remember(self, image: str, facts: ImageFacts) -> ImageFacts:
        self._facts[image] = (time.monotonic() + IMAGE_FACTS_TTL_S, facts)
        return facts

    async def remove_image(self, image: str) -> None:
        """Best effort: an image in use elsewhere, or already gone, stays as it is."""
        self._facts.pop(image, None)
        try:
            await asyncio.to_thread(self.client.images.remove, image)
        except DockerException as exc:
            log.info("image %s not removed: %s", image, explain(exc))

    async def _pull(
        self, repository: str, tag: str, tracker: PullTracker, report: PullReporter | None
    ) -> None:
        """Pulls through the engine's streaming API in a thread that feeds `tracker`; the
        latest state goes to `report` from the loop, so a slow reporter never holds up the
        pull and only the newest state of a burst is sent."""
        loop = asyncio.get_running_loop()
        latest = tracker.state()
        changed = asyncio.Event()
        changed.set()  # an empty first report says at once that a pull started
        abandoned = threading.Event()

        def publish(state: PullState) -> None:
            nonlocal latest
            latest = state
            changed.set()

        def pull() -> None:
            stream = self.client.api.pull(repository, tag=tag, stream=True, decode=True)
            for item in stream:
                if abandoned.is_set():
                    return
                tracker.feed(item)  # raises PullFailed on the engine's error item
                if report is not None:
                    try:
                        loop.call_soon_threadsafe(publish, tracker.state())
                    except RuntimeError:  # the loop is closed: nobody is listening
                        return

        async def reporter(report: PullReporter) -> None:
            while True:
                await changed.wait()
                changed.clear()
                await _report(report, latest)
                await asyncio.sleep(PULL_REPORT_INTERVAL_S)

        task = asyncio.create_task(reporter(report)) if report is not None else None
        try:
            await _in_thread(pull)
        finally:
            abandoned.set()
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def create(self, spec: ContainerSpec) -> Container:
        kwargs = self.create_arguments(spec)
        try:
            return await asyncio.to_thread(self.client.containers.create, spec.image, **kwargs)
        except APIError as exc:
            if exc.status_code != 409:
                raise InfrastructureError(f"creating the container: {explain(exc)}") from None
        # A leftover of this very attempt (a crash before its removal): replace it.
        await self.remove_by_name(spec.name)
        try:
            return await asyncio.to_thread(self.client.containers.create, spec.image, **kwargs)
        except Exception as exc:
            raise InfrastructureError(f"creating the container: {explain(exc)}") from None

    def create_arguments(self, spec: ContainerSpec) -> dict[str, Any]:
        """containers.create() arguments for a job: the hardening, its mounts, its share
        of the machine, and its GPUs by UUID."""
        limits = spec.limits
        kwargs: dict[str, Any] = {
            "name": spec.name,
            "command": spec.command,
            "environment": spec.env,
            "labels": spec.labels,
            "volumes": {
                str(spec.inputs_dir): {"bind": "/inputs", "mode": "ro"},
                str(spec.outputs_dir): {"bind": "/outputs", "mode": "rw"},
            },
            **hardening(limits.pids, spec.tmp_size_mb),
            "detach": True,
        }
        if spec.user is not None:
            kwargs["user"] = spec.user
        if spec.network:
            kwargs["network_mode"] = "bridge"
        if spec.runtime is not None:
            kwargs["runtime"] = spec.runtime
        if limits.memory_mb is not None:
            # The same for memory and swap: no swapping past the limit, the kernel's OOM
            # killer ends the job instead.
            kwargs["mem_limit"] = kwargs["memswap_limit"] = f"{limits.memory_mb}m"
        if limits.cpus is not None:
            kwargs["nano_cpus"] = int(limits.cpus * 1e9)
        if spec.real_gpus:
            kwargs["device_requests"] = gpu_requests(self.engine, spec.gpu_uuids, ["gpu"])
        return {**kwargs, **spec.extra}

    async def engine_version(self) -> str:
        """E.g. "Docker 27.3.1" or "Podman 4.3.1"; engine errors propagate."""
        info: dict[str, Any] = await asyncio.to_thread(self.client.version)
        names = " ".join(str(c.get("Name", "")) for c in info.get("Components") or [])
        engine = "Podman" if "podman" in names.lower() else "Docker"
        self.engine = f"{engine} {info.get('Version', 'unknown version')}"
        return self.engine

    async def started_at(self, container: Container) -> datetime | None:
        """When the container started, by the engine's clock."""
        await asyncio.to_thread(container.reload)
        text = str((container.attrs.get("State") or {}).get("StartedAt") or "")
        try:
            # RFC 3339, with nanoseconds: Python 3.11 reads it (to the microsecond).
            started = datetime.fromisoformat(text)
        except ValueError:
            return None
        # Docker's "never started" is year 1.
        if started.year <= 1970:
            return None
        return started if started.tzinfo else started.replace(tzinfo=UTC)

    async def oom_killed(self, container: Container) -> bool:
        """Whether the kernel killed the stopped container for going over its memory."""
        try:
            await asyncio.to_thread(container.reload)
        except NotFound:
            return False
        return bool((container.attrs.get("State") or {}).get("OOMKilled"))

    async def create_check(
        self, name: str, image: str, command: list[str], gpu_uuids: list[str] | None
    ) -> Container:
        """A short-lived container for the machine check: the jobs' hardening, no mounts,
        labelled LABEL_PREFLIGHT, given `gpu_uuids` like a job would be. The engine's
        APIError propagates as is, so the check can read the engine's own words."""
        kwargs: dict[str, Any] = {
            "name": name,
            "command": command,
            "labels": {LABEL_PREFLIGHT: "1"},
            **hardening(),
            "user": NOBODY,
            "detach": True,
        }
        if gpu_uuids is not None:
            # As for a job (runner._spec), plus "utility": with it the NVIDIA toolkit mounts
            # nvidia-smi into any image, so the check needs no CUDA image.
            kwargs["environment"] = {"NVIDIA_VISIBLE_DEVICES": ",".join(gpu_uuids)}
            kwargs["device_requests"] = gpu_requests(self.engine, gpu_uuids, ["gpu", "utility"])
        return await asyncio.to_thread(self.client.containers.create, image, **kwargs)

    async def output(self, container: Container) -> bytes:
        """Everything a stopped container wrote, stdout and stderr interleaved."""
        return await asyncio.to_thread(container.logs, stdout=True, stderr=True)

    async def start(self, container: Container) -> None:
        await asyncio.to_thread(container.start)

    def wait(self, container: Container) -> "asyncio.Future[int]":
        """Resolves to the exit code once the container stops."""

        def call() -> int:
            return int(container.wait()["StatusCode"])

        return _in_thread(call)

    def stream_logs(
        self, container: Container, on_chunk: Callable[[bytes | None], None]
    ) -> "asyncio.Future[None]":
        """Calls `on_chunk` (from its thread) with each output chunk, then with None."""

        def call() -> None:
            try:
                stream: Iterator[bytes] = container.logs(stream=True, follow=True)
                for chunk in stream:
                    on_chunk(chunk)
            finally:
                on_chunk(None)

        return _in_thread(call)

    async def stop(self, container: Container, grace_s: float) -> None:
        """SIGTERM, then SIGKILL after `grace_s`."""
        try:
            await asyncio.to_thread(container.stop, timeout=max(1, round(grace_s)))
        except NotFound:
            pass

    async def remove(self, container: Container) -> None:
        try:
            await asyncio.to_thread(container.remove, force=True, v=True)
        except NotFound:
            pass

    async def remove_by_name(self, name: str) -> None:
        try:
            container = await asyncio.to_thread(self.client.containers.get, name)
        except NotFound:
            return
        await self.remove(container)

    async def list_ours(self, provider_id: str) -> list[Container]:
        """Containers this provider started, running or not (leftovers of a crash)."""
        return await asyncio.to_thread(
            self.client.containers.list,
            all=True,
            filters={"label": f"{LABEL_PROVIDER}={provider_id}"},
        )
