"""One job attempt from assignment to `finished`: inputs, container, logs, outputs, cleanup.

A TaskRun never raises: whatever goes wrong ends as a `finished` event whose outcome
says whose fault it was, and the container and work dir are always removed.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from docker.errors import APIError
from docker.models.containers import Container

from common.messages import JobEvent, OutputFile, PullProgress, PullState, TaskAssignment
from provider_daemon.agent_api import AgentApi
from provider_daemon.containers import (
    LABEL_ATTEMPT,
    LABEL_JOB,
    LABEL_PROVIDER,
    Containers,
    ContainerSpec,
    ImageFacts,
    explain,
)
from provider_daemon.errors import InfrastructureError
from provider_daemon.logstream import LogLimits, LogPump
from provider_daemon.policy import (
    NOBODY,
    ContainerPolicy,
    Limits,
    image_size_refusal,
    limits_for,
    run_as,
)
from provider_daemon.publisher import Publisher
from provider_daemon.transfers import fetch_inputs, upload_results
from provider_daemon.workspace import (
    JobDir,
    create_job_dir,
    job_dir_of,
    remove_job_dir,
    save_task,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

Outcome = Literal["exited", "timed_out", "cancelled", "infrastructure"]
StopOutcome = Literal["cancelled", "infrastructure"]
# 128 + SIGKILL: what a container killed by the kernel's OOM killer exits with.
SIGKILL_EXIT = 137
# How long the followed log stream may take to end after the container did.
LOG_FOLLOW_GRACE_S = 2.0
# How long the log stream may lag behind the container's exit before we stop waiting.
LOG_DRAIN_S = 10.0


@dataclass
class RunnerDeps:
    """What every job attempt of this daemon shares."""

    provider_id: str
    publisher: Publisher
    containers: Containers
    agent: AgentApi
    work_dir: Path
    real_gpus: bool
    stop_grace_s: float = 10.0
    policy: ContainerPolicy = field(default_factory=ContainerPolicy)
    # The machine's size; each job gets its GPUs' share of CPUs and memory.
    machine_gpus: int = 1
    cpu_count: int | None = None
    memory_mb: int | None = None
    log_limits: LogLimits = field(default_factory=LogLimits)


@dataclass
class Result:
    outcome: Outcome
    exit_code: int | None = None
    reason: str | None = None
    # The container's run by this machine's clock: what the requester is billed for.
    started_at: datetime | None = None
    ended_at: datetime | None = None


class _Stopped(Exception):
    """The platform or the daemon asked this attempt to stop before its container ran."""


def _start_failure_exit_code(exc: Exception) -> int | None:
    # Like `docker run`: a command that cannot be executed is the user's error (126/127),
    # not the machine's.
    text = explain(exc).lower()
    if "executable file not found" in text or "no such file or directory" in text:
        return 127
    if "permission denied" in text:
        return 126
    return None


class TaskRun:
    def __init__(
        self, deps: RunnerDeps, task: TaskAssignment, adopted: Container | None = None
    ) -> None:
        """`adopted`: the attempt's container, started by an earlier run of the daemon,
        which this run follows to its end instead of starting one."""
        self.deps = deps
        self.task = task
        self.adopted = adopted
        # Set once the container has ended: its GPUs may go to the next job meanwhile.
        self.gpus_released = False
        self.log = logging.LoggerAdapter(log, {"job_id": task.job_id, "attempt": task.attempt})
        self._stop_requested = asyncio.Event()
        self._stop_outcome: StopOutcome = "cancelled"
        self._stop_reason = "cancelled"

    @property
    def key(self) -> tuple[str, int]:
        return (self.task.job_id, self.task.attempt)

    def request_stop(self, outcome: StopOutcome, reason: str) -> None:
        """Stops the attempt (its container, or its preparation); the first request wins."""
        if not self._stop_requested.is_set():
            self._stop_outcome, self._stop_reason = outcome, reason
            self._stop_requested.set()

    async def run(self) -> JobEvent | None:
        """Runs the attempt and publishes `started` and `finished`; returns the finished event
        (None if NATS stayed unreachable)."""
        task = self.task
        job: JobDir | None = None
        container: Container | None = None
        pump: LogPump | None = None
        outputs: list[OutputFile] = []
        try:
            if self.adopted is not None:
                job, container = job_dir_of(self.deps.work_dir, *self.key), self.adopted
                pump = self._pump(job)
                result = await self._readopt(container, job, pump)
            else:
                job = await asyncio.to_thread(
                    create_job_dir, self.deps.work_dir, task.job_id, task.attempt
                )
                await asyncio.to_thread(save_task, job, task)
                image = await self._until_stopped(self._prepare(job))
                container = await self.deps.containers.create(self._spec(job, image))
                pump = self._pump(job)
                result = await self._run_container(container, pump)
            if result.outcome != "infrastructure":
                result, outputs = await self._upload(job, result)
        except _Stopped:
            result = Result(self._stop_outcome, reason=self._stop_reason)
        except InfrastructureError as exc:
            result = Result("infrastructure", reason=str(exc))
        except Exception as exc:
            self.log.exception("job attempt failed in the daemon")
            result = Result("infrastructure", reason=f"provider daemon error: {explain(exc)}")
        finally:
            await self._cleanup(container, job)
        if result.outcome == "infrastructure":
            self.log.warning("job attempt failed: %s", result.reason)
        self.log.info("job attempt finished: %s (exit code %s)", result.outcome, result.exit_code)
        return await self.deps.publisher.event(
            task.job_id,
            task.attempt,
            "finished",
            exit_code=result.exit_code,
            outcome=result.outcome,
            reason=result.reason,
            log_tail=(pump.tail() or None) if pump else None,
            outputs=outputs,
            started_at=result.started_at,
            ended_at=result.ended_at,
        )

    def _pump(self, job: JobDir) -> LogPump:
        task = self.task
        return LogPump(
            task.job_id,
            task.attempt,
            job.log_file,
            self.deps.publisher.logs,
            limits=self.deps.log_limits,
            # A followed container's batches must not reuse the earlier run's numbers:
            # their message ids would be taken for replays and dropped.
            first_seq=time.time_ns() // 1000 if self.adopted is not None else 0,
        )

    async def _until_stopped(self, work: Awaitable[T]) -> T:
        """Awaits `work`, abandoning it if a stop is requested meanwhile."""
        job = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            raise _Stopped
        result = job.result()
        if self._stop_requested.is_set():
            raise _Stopped
        return result

    async def _prepare(self, job: JobDir) -> ImageFacts:
        task, containers = self.task, self.deps.containers
        fetched = await fetch_inputs(self.deps.agent, task, job)
        if fetched:
            self.log.info("fetched %d input files", fetched)
        image = await containers.ensure_image(task.image, self._report_pull)
        too_big = image_size_refusal(self.deps.policy, task.image, image.size_bytes)
        if too_big is not None:
            if image.pulled:
                await containers.remove_image(task.image)
            raise InfrastructureError(too_big)
        return image

    async def _report_pull(self, state: PullState) -> None:
        task = self.task
        progress = PullProgress(
            job_id=task.job_id, attempt=task.attempt, image=task.image, **state.model_dump()
        )
        await self.deps.publisher.pull_progress(progress)

    def _spec(self, job: JobDir, image: ImageFacts) -> ContainerSpec:
        task, deps = self.task, self.deps
        user = run_as(deps.policy, image.user)
        env = dict(task.env)
        if user == NOBODY:
            # nobody's home does not exist, and the root file system is read-only.
            env.setdefault("HOME", "/tmp")
        # The platform's variables win over the job's.
        # "void" rather than empty: CUDA images default to "all", and under some runtimes
        # an empty value exposes every GPU.
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(task.gpu_uuids) or "void"
        env["GPUMARKET_JOB_ID"] = task.job_id
        return ContainerSpec(
            name=f"gpumarket-{task.job_id}-{task.attempt}",
            image=task.image,
            command=task.command,
            env=env,
            labels={
                LABEL_JOB: task.job_id,
                LABEL_ATTEMPT: str(task.attempt),
                LABEL_PROVIDER: self.deps.provider_id,
            },
            inputs_dir=job.inputs,
            outputs_dir=job.outputs,
            gpu_uuids=task.gpu_uuids,
            real_gpus=deps.real_gpus and bool(task.gpu_uuids),
            limits=self.limits,
            user=user,
            network=task.egress and deps.policy.network,
            runtime=deps.policy.runtime,
            tmp_size_mb=deps.policy.tmp_size_mb,
        )

    @property
    def limits(self) -> Limits:
        deps = self.deps
        return limits_for(
            len(self.task.gpu_uuids),
            deps.machine_gpus,
            deps.cpu_count,
            deps.memory_mb,
            deps.policy.pids_limit,
        )

    async def _run_container(self, container: Container, pump: LogPump) -> Result:
        task, containers = self.task, self.deps.containers
        try:
            await containers.start(container)
        except APIError as exc:
            code = _start_failure_exit_code(exc)
            if code is None:
                raise InfrastructureError(f"starting the container: {explain(exc)}") from None
            await pump.put(f"cannot run the command: {explain(exc)}\n".encode())
            await pump.put(None)
            await pump.run()
            return Result("exited", exit_code=code, reason=explain(exc))
        started_at = datetime.now(UTC)
        self.log.info("container started: %s", task.image)
        await self.deps.publisher.event(task.job_id, task.attempt, "started")
        return await self._follow(container, pump, started_at, task.max_duration_s)

    async def _readopt(self, container: Container, job: JobDir, pump: LogPump) -> Result:
        """Follows a container an earlier run of the daemon started: the engine's log
        from where the log file ends, and the time limit from the container's start."""
        task = self.task
        started_at = await self.deps.containers.started_at(container) or datetime.now(UTC)
        ran_s = (datetime.now(UTC) - started_at).total_seconds()
        self.log.info("following the job's container again after %.0f s", ran_s)
        # Said again in case the earlier run died before it could: replays are harmless.
        await self.deps.publisher.event(task.job_id, task.attempt, "started")
        written = await asyncio.to_thread(lambda: job.log_file.stat().st_size)
        return await self._follow(
            container, pump, started_at, max(0.0, task.max_duration_s - ran_s), written
        )

    async def _follow(
        self,
        container: Container,
        pump: LogPump,
        started_at: datetime,
        time_left_s: float,
        skip_bytes: int = 0,
    ) -> Result:
        """Streams the running container's output into `pump` (less the first
        `skip_bytes`, already in the log file) until it exits, times out or is stopped."""
        task, containers = self.task, self.deps.containers
        loop = asyncio.get_running_loop()
        abandoned = False
        # Bytes of the engine's log stream seen so far; the lock makes "stop feeding and
        # say how far it got" one step for _fetch_rest.
        delivered = 0
        feeding = threading.Lock()

        def on_chunk(chunk: bytes | None) -> None:
            # From the log thread: wait for room in the pump's queue (backpressure), but
            # never forever in case the pump is gone.
            nonlocal abandoned, skip_bytes, delivered
            with feeding:
                if abandoned:
                    return
                if chunk:
                    delivered += len(chunk)
                if chunk and skip_bytes:
                    chunk, skip_bytes = chunk[skip_bytes:], max(0, skip_bytes - len(chunk))
                    if not chunk:
                        return
                if not pump.put_from_thread(chunk, loop, timeout_s=60):
                    abandoned = True

        def stop_feeding() -> int:
            nonlocal abandoned
            with feeding:
                abandoned = True
                return delivered

        pump_task = asyncio.create_task(pump.run())
        stream = containers.stream_logs(container, on_chunk)
        waiting = containers.wait(container)
        stop = asyncio.ensure_future(self._stop_requested.wait())
        watched: set[asyncio.Future[Any]] = {waiting, stop}
        try:
            done, _ = await asyncio.wait(
                watched, timeout=time_left_s, return_when=asyncio.FIRST_COMPLETED
            )
            if waiting in done:
                result = Result("exited", exit_code=waiting.result())
                result.reason = await self._kill_reason(container, result.exit_code)
            else:
                if stop in done:
                    result = Result(self._stop_outcome, reason=self._stop_reason)
                else:
                    result = Result("timed_out", reason=f"ran longer than {task.max_duration_s} s")
                self.log.info("stopping the container: %s", result.reason)
                await containers.stop(container, self.deps.stop_grace_s)
                result.exit_code = await asyncio.wait_for(waiting, self.deps.stop_grace_s + 30)
            result.started_at, result.ended_at = started_at, datetime.now(UTC)
            await self._release_gpus(result)
            await asyncio.wait({pump_task}, timeout=LOG_FOLLOW_GRACE_S)
            if not pump_task.done():
                # Podman's followed stream sometimes outlives its container: the rest of
                # the output comes from a plain read instead.
                seen = await asyncio.to_thread(stop_feeding)
                await self._fetch_rest(container, pump, seen)
                await asyncio.wait({pump_task}, timeout=LOG_DRAIN_S)
            return result
        finally:
            stop.cancel()
            if not pump_task.done():
                pump_task.cancel()
            await asyncio.gather(pump_task, return_exceptions=True)
            # Both threads end when the container is removed; nobody waits for them.
            waiting.cancel()
            stream.cancel()

    async def _release_gpus(self, result: Result) -> None:
        """The container has ended: its GPUs may take the next job (the platform frees
        them on `exited`) while this attempt uploads its results."""
        self.gpus_released = True
        task = self.task
        await self.deps.publisher.event(
            task.job_id, task.attempt, "exited", exit_code=result.exit_code
        )

    async def _fetch_rest(self, container: Container, pump: LogPump, seen: int) -> None:
        """Ends `pump` with the container's output past the first `seen` bytes."""
        try:
            whole = await self.deps.containers.output(container)
        except Exception as exc:
            self.log.warning("could not read the rest of the output: %s", explain(exc))
            whole = b""
        if len(whole) > seen:
            await pump.put(whole[seen:])
        await pump.put(None)

    async def _kill_reason(self, container: Container, exit_code: int | None) -> str | None:
        """Why a container we did not stop died, when the engine can tell: the kernel's
        OOM killer. Podman on cgroup v1 never reports OOMKilled, so a SIGKILL (137) under a
        memory limit is named as its most likely cause."""
        memory_mb = self.limits.memory_mb
        if exit_code in (0, None):
            return None
        if await self.deps.containers.oom_killed(container):
            return f"killed for running out of memory (the job's limit here is {memory_mb} MiB)"
        if exit_code == SIGKILL_EXIT and memory_mb is not None:
            return (
                f"killed by SIGKILL (exit code {SIGKILL_EXIT}), most likely for running out of "
                f"memory (the job's limit here is {memory_mb} MiB)"
            )
        return None

    async def _upload(self, job: JobDir, result: Result) -> tuple[Result, list[OutputFile]]:
        """Uploads outputs and the log. If that fails, a job that ran to its end is the
        infrastructure's failure (its results are lost); a stopped one keeps its outcome."""
        try:
            files = await upload_results(self.deps.agent, self.task, job)
        except InfrastructureError as exc:
            reason = f"uploading results failed: {exc}"
            if result.outcome == "exited":
                return replace(result, outcome="infrastructure", reason=reason), []
            self.log.warning("%s", reason)
            return result, []
        self.log.info("uploaded %d output files and the log", len(files))
        return result, files

    async def _cleanup(self, container: Container | None, job: JobDir | None) -> None:
        # Shielded: a daemon being cancelled must still leave no container behind.
        async def clean() -> None:
            if container is not None:
                try:
                    await self.deps.containers.remove(container)
                except Exception as exc:
                    self.log.error("could not remove container: %s", explain(exc))
            if job is not None:
                await asyncio.to_thread(remove_job_dir, job)

        await asyncio.shield(clean())
