"""The machine check before listing, so no job lands where it cannot run.

At join and at each start the daemon runs one short-lived container exactly as hardened as
a job's. With simulated GPUs it only proves that the engine can create, start, wait for,
read and remove a container. With real GPUs the container is given every GPU of the
inventory by UUID and must list them all with `nvidia-smi -L`: a missing or unconfigured
NVIDIA Container Toolkit is caught here, not by a requester's failed job.

Every failure is a PreflightError whose message is one sentence the owner can act on.
"""

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass, field

from docker.errors import DockerException
from docker.models.containers import Container

from provider_daemon.containers import Containers, explain
from provider_daemon.errors import InfrastructureError, PreflightError
from provider_daemon.gpus import Inventory

log = logging.getLogger(__name__)

MARKER = "gpumarket-preflight-ok"
SIMULATED_COMMAND = ["sh", "-c", f"echo {MARKER}"]
GPU_COMMAND = ["nvidia-smi", "-L"]
# How much of a container's output an error message quotes.
OUTPUT_QUOTE_CHARS = 400

# `nvidia-smi -L` prints "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5f3c...)" per GPU (and
# "MIG ... (UUID: MIG-...)" per MIG device).
_LISTED_UUID = re.compile(r"\(UUID:\s*([^)\s]+)\)")
# What engines say when nothing handles the "nvidia" device request (Docker), or when the
# request was dropped and nvidia-smi was therefore never mounted into the container: Podman's
# Docker-compatible API ignores DeviceRequests, and runc ("executable file not found in
# $PATH") or crun ("executable file `nvidia-smi` not found") then cannot run it.
_NO_TOOLKIT = (
    re.compile(r"could not select device driver", re.I),
    re.compile(r"unknown or invalid runtime name:?\s*nvidia", re.I),
    re.compile(r"unresolvable CDI devices", re.I),
    re.compile(r"nvidia-smi\W+(executable file )?not found", re.I),
    re.compile(r"executable file\W+nvidia-smi\W+not found", re.I),
)
# The toolkit is there but failed (no driver loaded, an unknown UUID, ...).
_TOOLKIT_FAILED = re.compile(r"nvidia-container-cli|nvidia-container-runtime", re.I)


@dataclass(frozen=True)
class PreflightReport:
    engine: str
    image: str
    simulated: bool
    # UUIDs that `nvidia-smi -L` listed inside the check container; empty when simulated.
    gpus_seen: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class CheckRun:
    exit_code: int
    output: str


class EngineRefused(Exception):
    """The engine would not create or start the check container; holds its own words."""

    def __init__(self, stage: str, words: str) -> None:
        super().__init__(f"{stage} the check container: {words}")
        self.stage = stage
        self.words = words


async def check_machine(
    containers: Containers, inventory: Inventory, image: str, timeout_s: float = 120.0
) -> PreflightReport:
    """Proves that containers run here, and on real GPUs that they see their GPUs.

    `timeout_s` bounds the check container (create to exit), not pulling `image`: a first
    pull of a large image on a slow line is no fault of the machine.
    """
    started = time.monotonic()
    try:
        engine = await containers.engine_version()
    except (DockerException, OSError) as exc:
        raise PreflightError(
            f"cannot reach the container engine at {containers.docker_host}: {explain(exc)}"
        ) from None
    try:
        await containers.ensure_image(image)
    except InfrastructureError as exc:
        raise PreflightError(
            f"the container engine ({engine}) could not get the check image: {exc}"
        ) from None

    gpu_uuids = [g.uuid for g in inventory.gpus]
    if not inventory.simulated and not gpu_uuids:
        raise PreflightError("there is no GPU on this machine to check")
    gpus = None if inventory.simulated else gpu_uuids
    command = SIMULATED_COMMAND if gpus is None else GPU_COMMAND
    try:
        run = await run_check_container(containers, image, command, gpus, timeout_s)
    except EngineRefused as exc:
        raise refusal_error(exc.stage, exc.words, engine, real_gpus=gpus is not None) from None
    except PreflightError:
        raise
    except (DockerException, OSError) as exc:
        raise PreflightError(
            f"the container engine ({engine}) failed during the machine check: {explain(exc)}"
        ) from None

    seen: list[str] = []
    if gpus is None:
        if run.exit_code != 0 or MARKER not in run.output:
            raise PreflightError(
                f"the check container from {image} did not run correctly on {engine} "
                f"(exit code {run.exit_code}, output: {_quote(run.output)})"
            )
    else:
        seen = check_gpu_listing(run.exit_code, run.output, gpu_uuids, engine)
    report = PreflightReport(
        engine=engine,
        image=image,
        simulated=inventory.simulated,
        gpus_seen=seen,
        seconds=round(time.monotonic() - started, 3),
    )
    log.info(
        "machine check passed on %s in %.1f s%s",
        engine,
        report.seconds,
        "" if inventory.simulated else f": a container saw all {len(seen)} GPUs",
    )
    return report


async def run_check_container(
    containers: Containers,
    image: str,
    command: list[str],
    gpu_uuids: list[str] | None,
    timeout_s: float,
) -> CheckRun:
    """Runs one check container to its end and returns its exit code and output.

    The container is always removed, also on error, timeout or cancellation. Raises
    EngineRefused if the engine will not create or start it, and PreflightError if it
    has not ended after `timeout_s` (it is killed then).
    """
    name = f"gpumarket-preflight-{uuid.uuid4().hex[:12]}"
    # A task of its own, so a timeout during the (uncancellable) create call still lets
    # the cleanup get hold of the container it makes.
    creating = asyncio.ensure_future(containers.create_check(name, image, command, gpu_uuids))
    timer = asyncio.timeout(timeout_s)
    try:
        async with timer:
            try:
                container = await asyncio.shield(creating)
            except (DockerException, OSError) as exc:
                raise EngineRefused("creating", explain(exc)) from None
            try:
                await containers.start(container)
            except (DockerException, OSError) as exc:
                raise EngineRefused("starting", explain(exc)) from None
            exit_code = await containers.wait(container)
            output = (await containers.output(container)).decode(errors="replace")
    except TimeoutError:
        if not timer.expired():
            raise
        raise PreflightError(
            f"the check container did not finish within {timeout_s:g} s and was killed; "
            "the container engine is stuck or far too slow"
        ) from None
    finally:
        await asyncio.shield(_discard(containers, creating))
    return CheckRun(exit_code, output)


async def _discard(containers: Containers, creating: "asyncio.Future[Container]") -> None:
    try:
        # Bounded by the docker client's own timeout.
        container = await creating
    except BaseException:
        return  # nothing was created
    try:
        # Forced: kills it first if it still runs.
        await containers.remove(container)
    except Exception as exc:
        log.error("could not remove the check container %s: %s", container.name, explain(exc))


def _toolkit_hint(engine: str) -> str:
    hint = (
        "install nvidia-container-toolkit, run `sudo nvidia-ctk runtime configure "
        "--runtime=docker` and restart Docker"
    )
    if engine.lower().startswith("podman"):
        # Seen with Podman 4.3 here and reported up to 4.9: the request is silently dropped.
        hint += (
            " (Podman's Docker-compatible API ignores GPU device requests, "
            "so use Docker on a machine with real GPUs)"
        )
    return hint


def toolkit_missing(engine: str, words: str) -> PreflightError:
    return PreflightError(
        f"containers on this machine cannot see its GPUs: the NVIDIA Container Toolkit is "
        f"missing or not configured for {engine} ({engine} said: {_quote(words)}); "
        f"{_toolkit_hint(engine)}"
    )


def refusal_error(stage: str, words: str, engine: str, real_gpus: bool) -> PreflightError:
    """What to tell the owner when the engine would not create or start the container."""
    if real_gpus and any(p.search(words) for p in _NO_TOOLKIT):
        return toolkit_missing(engine, words)
    if real_gpus and _TOOLKIT_FAILED.search(words):
        return PreflightError(
            f"the NVIDIA Container Toolkit could not give the check container its GPUs "
            f"({engine} said: {_quote(words)}); check that `nvidia-smi` works on this machine "
            "and that the toolkit matches the driver"
        )
    return PreflightError(
        f"the container engine ({engine}) cannot run containers here: {stage} the check "
        f"container failed: {_quote(words)}"
    )


def check_gpu_listing(
    exit_code: int, output: str, expected: list[str], engine: str = "the container engine"
) -> list[str]:
    """Returns the UUIDs that `nvidia-smi -L` listed; raises PreflightError unless it
    succeeded and listed every one of `expected`."""
    if exit_code == 127 or any(p.search(output) for p in _NO_TOOLKIT):
        # A shell entrypoint could not find nvidia-smi: the toolkit never mounted it.
        raise toolkit_missing(engine, output.strip() or f"exit code {exit_code}")
    if exit_code != 0:
        raise PreflightError(
            f"nvidia-smi failed in the check container (exit code {exit_code}): "
            f"{_quote(output)}; check the NVIDIA driver with `nvidia-smi` on this machine"
        )
    seen = _LISTED_UUID.findall(output)
    missing = [u for u in expected if u not in seen]
    if missing:
        raise PreflightError(
            f"a container given all {len(expected)} GPUs could not see "
            f"{len(missing)} of them ({', '.join(missing)}); nvidia-smi -L listed: "
            f"{_quote(output)}; check the NVIDIA Container Toolkit's configuration"
        )
    return seen


def _quote(text: str) -> str:
    """The output on one line, its end if it is long (where the error usually is)."""
    flat = " ".join(text.split())
    if not flat:
        return "(no output)"
    if len(flat) > OUTPUT_QUOTE_CHARS:
        flat = "..." + flat[-OUTPUT_QUOTE_CHARS:]
    return flat
