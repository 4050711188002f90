"""The run loop, shaped like Prefect's worker: a task loop and a heartbeat loop under one
TaskGroup; a stop event ends both, running jobs are stopped and reported, NATS drains."""

import asyncio
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from pydantic import Field, TypeAdapter, ValidationError

from common.aio import wait_event
from common.messages import Heartbeat, TaskAssignment, TaskCancel
from common.nats_client import connect_nats
from common.subjects import TASKS_STREAM, heartbeat_subject, provider_durable, tasks_subject
from provider_daemon import metrics
from provider_daemon.agent_api import AgentApi
from provider_daemon.config import ProviderConfig
from provider_daemon.containers import LABEL_ATTEMPT, LABEL_JOB, Containers
from provider_daemon.enroll import memory_mb
from provider_daemon.errors import (
    CredentialRejected,
    DaemonError,
    InfrastructureError,
    OwnerDisabled,
)
from provider_daemon.gpus import GpuSource
from provider_daemon.logstream import LogLimits
from provider_daemon.policy import task_refusal
from provider_daemon.preflight import check_machine
from provider_daemon.publisher import Publisher
from provider_daemon.runner import RunnerDeps, TaskRun
from provider_daemon.workspace import job_dir_of, job_dirs, remove_job_dir, saved_task

log = logging.getLogger(__name__)

TaskMessage: TypeAdapter[TaskAssignment | TaskCancel] = TypeAdapter(
    Annotated[TaskAssignment | TaskCancel, Field(discriminator="kind")]
)
STOPPED_REASON = "provider daemon stopped"
# Finished attempts remembered so a redelivered assignment is not run twice.
REMEMBER_FINISHED = 10_000


@dataclass
class Tuning:
    """Timings that tests shorten."""

    fetch_timeout_s: float = 2.0
    stop_grace_s: float = 10.0
    reconnect_wait_s: float = 2.0
    metrics_host: str = "127.0.0.1"
    # How often the daemon asks the platform whether it still accepts this machine.
    credential_check_s: float = 60.0
    log_limits: LogLimits = field(default_factory=LogLimits)


_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionClosedError,
    nats.errors.NoServersError,
)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Daemon:
    def __init__(
        self,
        config: ProviderConfig,
        gpus: GpuSource,
        *,
        metrics_port: int | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        self.config = config
        self.gpus = gpus
        self.inventory = gpus.inventory()
        self.metrics_port = metrics_port
        self.tuning = tuning or Tuning()
        self.active: dict[tuple[str, int], TaskRun] = {}
        self.finished: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._disconnected_at: float | None = None
        self.nc: NatsClient | None = None
        # True once the task consumer exists (for readiness checks).
        self.subscribed = False
        self._closing = False
        # Set when the platform cut this machine off; run() raises it after stopping.
        self.rejected: CredentialRejected | None = None
        # Never the URL itself: it may carry credentials.
        url = urlsplit(config.nats_url)
        self._nats_host = f"{url.hostname}:{url.port or 4222}" if url.hostname else "?"

    # --- NATS connection -------------------------------------------------------------

    def _outage(self, cause: str) -> None:
        # One line per outage, whichever callback hears of it first.
        if self._disconnected_at is None and not self._closing:
            self._disconnected_at = time.monotonic()
            if self.nc is None:
                log.warning("cannot reach NATS at %s (%s); retrying", self._nats_host, cause)
            else:
                log.warning("NATS connection lost (%s); reconnecting", cause)

    async def _on_disconnected(self) -> None:
        self._outage("disconnected")

    async def _on_reconnected(self) -> None:
        lost = time.monotonic() - (self._disconnected_at or time.monotonic())
        self._disconnected_at = None
        url = self.nc.connected_url.netloc if self.nc and self.nc.connected_url else "?"
        log.info("NATS reconnected to %s after %.1f s", url, lost)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, _CONNECTION_ERRORS):
            self._outage(_one_line(exc))
            # Every failed reconnect attempt lands here too: not worth a line each.
            log.debug("NATS: %s", _one_line(exc))
        else:
            log.warning("NATS: %s", _one_line(exc))

    async def _connect(self, stop: asyncio.Event) -> NatsClient | None:
        """Connects, retrying forever; None if stopped first."""
        log.info("connecting to NATS at %s", self._nats_host)
        connecting = asyncio.create_task(
            connect_nats(
                self.config.nats_url,
                f"provider-daemon {self.config.provider_id}",
                reconnect_time_wait=self.tuning.reconnect_wait_s,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
                error_cb=self._on_error,
            )
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            return None
        nc = connecting.result()
        self._disconnected_at = None
        log.info("connected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")
        return nc

    # --- the run ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until `stop` is set; then stops every job, reports it, and drains NATS."""
        containers = Containers(self.config.docker_host)
        report = await check_machine(containers, self.inventory, self.config.check_image)
        log.info("machine check passed: %s", report)
        sock = None
        if self.metrics_port is not None:
            sock = metrics.bind(self.tuning.metrics_host, self.metrics_port)
        agent = AgentApi(self.config.api_url, self.config.credential)
        try:
            nc = await self._connect(stop)
            if nc is None:
                return
            self.nc = nc
            js = nc.jetstream()
            publisher = Publisher(js, self.config.provider_id, nc=nc)
            deps = RunnerDeps(
                provider_id=self.config.provider_id,
                publisher=publisher,
                containers=containers,
                agent=agent,
                work_dir=self.config.work_dir,
                real_gpus=not self.inventory.simulated,
                stop_grace_s=self.tuning.stop_grace_s,
                policy=self.config.policy,
                machine_gpus=len(self.inventory.gpus),
                cpu_count=self.config.cpu_count or os.cpu_count(),
                memory_mb=self.config.memory_mb or memory_mb(),
                log_limits=self.tuning.log_limits,
            )
            adopted = await self._recover(deps)
            log.info(
                "provider %s ready with %d GPUs%s",
                self.config.provider_id,
                len(self.inventory.gpus),
                " (simulated)" if self.inventory.simulated else "",
            )
            async with asyncio.TaskGroup() as tg:
                for run in adopted:
                    self._start(run, tg)
                tg.create_task(self._task_loop(js, deps, publisher, stop, tg))
                tg.create_task(self._heartbeat_loop(nc, stop))
                tg.create_task(self._watch_credential(agent, stop))
                if sock is not None:
                    tg.create_task(metrics.serve(metrics.make_app(self._health), sock, stop))
            self._closing = True
            await nc.drain()
            log.info("provider daemon stopped")
            if self.rejected is not None:
                raise self.rejected
        finally:
            await agent.aclose()
            containers.close()
            if sock is not None:
                sock.close()

    async def _watch_credential(self, agent: AgentApi, stop: asyncio.Event) -> None:
        """Stops the daemon, with one clear line, once the platform refuses this machine
        for good (its credential revoked, or it left). A disabled owner only pauses it
        (the platform places no work meanwhile), and an unreachable platform is only
        logged: the daemon keeps serving tasks over NATS meanwhile."""
        while not await wait_event(stop, self.tuning.credential_check_s):
            try:
                await agent.status()
            except CredentialRejected as exc:
                log.error("%s; stopping", exc)
                self.rejected = exc
                stop.set()
            except OwnerDisabled as exc:
                log.warning("%s", exc)
            except DaemonError as exc:
                log.warning("cannot check in with the platform: %s", exc)

    def _health(self) -> tuple[bool, dict[str, object]]:
        connected = self.nc is not None and self.nc.is_connected
        status = "connected" if connected else "disconnected"
        return connected, {"nats": status, "running_jobs": len(self.active)}

    async def _recover(self, deps: RunnerDeps) -> list[TaskRun]:
        """Containers of ours that outlived an earlier run of the daemon (a crash, an
        upgrade): one that runs or ran a job whose assignment is still on disk is followed
        again to its end, as if nothing happened; any other is removed and its attempt
        reported lost, so the platform retries it. Job directories of no followed job go."""
        adopted: list[TaskRun] = []
        for container in await deps.containers.list_ours(self.config.provider_id):
            labels = container.labels
            job_id, attempt = labels.get(LABEL_JOB), labels.get(LABEL_ATTEMPT, "")
            task = self._saved_task(job_id, attempt)
            if task is not None and container.status in ("running", "exited"):
                log.info(
                    "found the job's container (%s) from an earlier run; following it",
                    container.status,
                    extra={"job_id": job_id, "attempt": task.attempt},
                )
                adopted.append(TaskRun(deps, task, adopted=container))
                continue
            log.warning("removing a leftover container", extra={"job_id": job_id})
            await deps.containers.remove(container)
            if job_id and attempt.isdigit():
                await deps.publisher.event(
                    job_id,
                    int(attempt),
                    "finished",
                    outcome="infrastructure",
                    reason="provider daemon restarted while the job ran",
                )
        kept = {job_dir_of(self.config.work_dir, *run.key).root for run in adopted}
        for job in await asyncio.to_thread(job_dirs, self.config.work_dir):
            if job.root not in kept:
                await asyncio.to_thread(remove_job_dir, job)
        return adopted

    def _saved_task(self, job_id: str | None, attempt: str) -> TaskAssignment | None:
        """The assignment an earlier run saved for this container, if it is whole and
        still fits this machine."""
        if not job_id or not attempt.isdigit():
            return None
        try:
            task = saved_task(job_dir_of(self.config.work_dir, job_id, int(attempt)))
        except InfrastructureError:
            return None
        if task is None or (task.job_id, task.attempt) != (job_id, int(attempt)):
            return None
        if not set(task.gpu_uuids) <= self.inventory.uuids:
            return None
        return task

    # --- tasks -----------------------------------------------------------------------

    async def _subscribe(
        self, js: JetStreamContext, stop: asyncio.Event
    ) -> JetStreamContext.PullSubscription | None:
        pid = self.config.provider_id
        delay = 1.0
        while not stop.is_set():
            try:
                return await js.pull_subscribe(
                    tasks_subject(pid), durable=provider_durable(pid), stream=TASKS_STREAM
                )
            except (NatsError, TimeoutError) as exc:
                log.warning("cannot subscribe to tasks (%s); retrying", _one_line(exc))
                await wait_event(stop, delay)
                delay = min(delay * 2, 30.0)
        return None

    async def _task_loop(
        self,
        js: JetStreamContext,
        deps: RunnerDeps,
        publisher: Publisher,
        stop: asyncio.Event,
        tg: asyncio.TaskGroup,
    ) -> None:
        sub = await self._subscribe(js, stop)
        self.subscribed = sub is not None
        delay = 1.0
        while sub is not None and not stop.is_set():
            fetching = asyncio.ensure_future(
                sub.fetch(batch=10, timeout=self.tuning.fetch_timeout_s)
            )
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({fetching, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if stop.is_set():
                self._stop_all()
            try:
                # Not cancelled on stop: a cancelled fetch leaves the server's late reply
                # in the subscription's queue, and drain() then waits for it in vain.
                msgs = await fetching
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except NatsError as exc:
                log.warning("fetching tasks failed (%s); retrying", _one_line(exc))
                await wait_event(stop, delay + random.uniform(0, delay / 2))
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            for msg in msgs:
                if stop.is_set():
                    # Handed back at once for whoever runs this provider next.
                    await _settle(msg.nak())
                else:
                    await self._handle(msg, deps, publisher, tg)
        self._stop_all()
        if sub is not None:
            try:
                await sub.unsubscribe()
            except NatsError as exc:
                log.warning("could not unsubscribe from tasks: %s", _one_line(exc))

    def _stop_all(self) -> None:
        for run in list(self.active.values()):
            run.request_stop("infrastructure", STOPPED_REASON)

    async def _handle(
        self, msg: Msg, deps: RunnerDeps, publisher: Publisher, tg: asyncio.TaskGroup
    ) -> None:
        try:
            task = TaskMessage.validate_json(msg.data)
        except ValidationError as exc:
            # Redelivering a message we cannot read would only repeat this.
            log.error("dropping an unreadable task message: %s", exc.errors()[0]["msg"])
            await _settle(msg.term())
            return
        key = (task.job_id, task.attempt)
        extra = {"job_id": task.job_id, "attempt": task.attempt}
        if isinstance(task, TaskCancel):
            run = self.active.get(key)
            if run is not None:
                log.info("cancel requested", extra=extra)
                run.request_stop("cancelled", "cancelled")
            elif key not in self.finished:
                # Never ran here (its task was lost, or is still behind this message): say
                # so, so the platform frees its GPUs, and refuse the task if it comes.
                log.info("cancel for an attempt that never ran here", extra=extra)
                if (
                    await publisher.event(
                        task.job_id,
                        task.attempt,
                        "finished",
                        outcome="cancelled",
                        reason="cancelled before it started on this machine",
                    )
                    is None
                ):
                    await _settle(msg.nak(delay=5))
                    return
                self._remember(key)
            await _settle(msg.ack())
            return
        if key in self.active or key in self.finished:
            log.info("assignment already seen; ignored", extra=extra)
            await _settle(msg.ack())
            return
        problem = task_refusal(self.config.policy, task) or self._gpu_problem(task)
        if problem is not None:
            log.warning("assignment rejected: %s", problem, extra=extra)
            if await publisher.event(task.job_id, task.attempt, "rejected", reason=problem):
                self._remember(key)
                await _settle(msg.ack())
            else:
                await _settle(msg.nak(delay=5))
            return
        if await publisher.event(task.job_id, task.attempt, "accepted") is None:
            # Not acked: JetStream hands it over again once NATS is back.
            await _settle(msg.nak(delay=5))
            return
        await _settle(msg.ack())
        log.info("assignment accepted: %s on %s", task.image, task.gpu_uuids, extra=extra)
        self._start(TaskRun(deps, task), tg)

    def _start(self, run: TaskRun, tg: asyncio.TaskGroup) -> None:
        self.active[run.key] = run
        metrics.RUNNING.set(len(self.active))
        tg.create_task(self._execute(run))

    def _gpu_problem(self, task: TaskAssignment) -> str | None:
        if not task.gpu_uuids:
            return None
        unknown = [u for u in task.gpu_uuids if u not in self.inventory.uuids]
        if unknown:
            return f"no such GPU on this machine: {', '.join(unknown)}"
        busy = [u for u in task.gpu_uuids if u in self._busy_gpus()]
        if busy:
            return f"GPU already in use by another job: {', '.join(busy)}"
        unhealthy = self.gpus.unhealthy()
        sick = [f"{u} ({unhealthy[u]})" for u in task.gpu_uuids if u in unhealthy]
        if sick:
            return f"GPU unhealthy: {', '.join(sick)}"
        return None

    def _busy_gpus(self) -> set[str]:
        """GPUs of attempts whose container still runs (not those uploading results)."""
        return {
            u for run in self.active.values() if not run.gpus_released for u in run.task.gpu_uuids
        }

    def _remember(self, key: tuple[str, int]) -> None:
        self.finished[key] = None
        while len(self.finished) > REMEMBER_FINISHED:
            self.finished.popitem(last=False)

    async def _execute(self, run: TaskRun) -> None:
        event = None
        try:
            event = await run.run()
        finally:
            self.active.pop(run.key, None)
            self._remember(run.key)
            metrics.RUNNING.set(len(self.active))
            metrics.TASKS.labels(event.outcome if event else "unreported").inc()

    # --- heartbeats ------------------------------------------------------------------

    async def _heartbeat_loop(self, nc: NatsClient, stop: asyncio.Event) -> None:
        interval = self.config.heartbeat_interval_s
        subject = heartbeat_subject(self.config.provider_id)
        while not stop.is_set():
            try:
                gpu_metrics = await asyncio.to_thread(self.gpus.metrics, self._busy_gpus())
                metrics.record_gpus(gpu_metrics)
                beat = Heartbeat(
                    provider_id=self.config.provider_id,
                    at=datetime.now(UTC),
                    running_jobs=sorted({job_id for job_id, _ in self.active}),
                    gpus=gpu_metrics,
                )
                # Core NATS: a lost heartbeat is replaced by the next one.
                await nc.publish(subject, beat.model_dump_json().encode())
            except Exception as exc:
                log.warning("heartbeat not sent: %s", _one_line(exc))
            # Jitter, so a fleet restarted together does not beat in lockstep.
            await wait_event(stop, interval * random.uniform(0.9, 1.1))


async def _settle(ack: Awaitable[object]) -> None:
    """Acks and naks are best effort: an unacked message simply comes back later."""
    try:
        await ack
    except Exception as exc:
        log.warning("could not ack a task message: %s", _one_line(exc))
