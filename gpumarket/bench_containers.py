"""`gpumarket bench containers`: the platform's overhead over the container engine itself.

On a started local platform (every server and service, one provider daemon with C
simulated GPUs), the same short container runs M times two ways:

- **the engine**: straight through docker-py against the daemon's own podman socket, C at
  once (the daemon runs one job per GPU), with the daemon's own container arguments
  (`Containers.create_arguments`: the hardening, the job's share of CPUs and memory, its
  user, the job dir's /inputs and /outputs bind mounts, its environment; no labels):
  create, start, wait, fetch the output, remove. That is what a job's container costs.
  Run before and after the platform's part, so drift on a shared machine (other load,
  podman's state growing) weighs on both sides alike; its rate is over both runs.
- **the platform**: M jobs submitted through the gateway with the typed client (one
  request each from a few threads, or `--array`: one job array), placed by the
  scheduler, run by the daemon (accept, job dir, image check, container, log stream to
  NATS, outputs and log uploaded through presigned URLs, `finished` back to the
  scheduler, which frees the GPU for the next job).

One warm-up container or job goes through each path first, uncounted. Rates count
succeeded runs only (exit code 0): the engine's over its wall time, the platform's from
the first submit to the last job's `finished_at`. The last line printed is JSON: both
rates and their ratio, the platform's per-job phases from the job records and the
daemon's log, the engine's per-call times, and CPU seconds per process over each part.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from gpumarket.bench_heartbeats import CLK_TCK, machine_ticks, proc_stats, progress_bar, tree_ticks
from gpumarket.bench_scheduling import BenchError
from gpumarket.client import Client
from gpumarket.platform import SAMPLE_IMAGE, LocalPlatform
from provider_daemon.containers import Containers, ContainerSpec
from provider_daemon.policy import NOBODY, ContainerPolicy, limits_for, run_as
from provider_daemon.workspace import JobDir, create_job_dir, remove_job_dir
from scheduler import states
from scheduler.schemas import JobOut

DEFAULT_COMMAND = ["echo", "hello from gpumarket"]
# The uncounted first container or job of each part: one that succeeds whatever the
# measured command does.
WARMUP_COMMAND = ["true"]
# The scheduler's histogram of placement passes (scheduler.worker.PASS_SECONDS).
PASS_METRIC = "scheduler_placement_pass_seconds"
# Threads submitting one job per request (as `gpumarket bench jobs` does).
SUBMITTERS = 4
# How often the platform's progress is read while the oldest job runs; the figures come
# from the job records, not from when we happened to look.
POLL_S = 1.0
# A part during which the machine's CPUs were busier than this gets a warning.
BUSY = 0.9
# Failures listed in the JSON (all are counted).
FAILURES_SHOWN = 10
# The platform processes' names (LocalPlatform) and the servers, for CPU accounting.
SERVICES = ("gateway", "auth_service", "storage_service", "provider_registry", "scheduler",
            "provider_daemon")  # fmt: skip
SERVERS = ("postgres", "nats", "s3", "podman")
# The daemon's own log lines that mark a job's steps (provider_daemon.daemon, .runner).
DAEMON_MARKS = {
    "accepted": "assignment accepted",
    "container_started": "container started",
    "uploaded": "uploaded ",
    "attempt_finished": "job attempt finished",
}
# The keys every run's JSON line holds (more may follow).
RESULT_KEYS = ("jobs", "concurrency", "succeeded", "failed", "platform_jobs_per_s",
               "engine_jobs_per_s", "ratio", "platform_phases_p50_s", "daemon_phases_p50_s",
               "engine_phases_p50_s", "cpu_s")  # fmt: skip


Phases = dict[str, list[float]]


def present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summary(phases: Phases, prefix: str) -> dict[str, dict[str, float | None]]:
    """`<prefix>_p50_s`, `_mean_s` and `_max_s`: one dict of phases each. The mean is
    what throughput feels; the median and the max tell a steady cost from rare stalls."""
    figures: dict[str, Callable[[list[float]], float]] = {
        "p50": statistics.median,
        "mean": statistics.fmean,
        "max": max,
    }
    return {
        f"{prefix}_{name}_s": {
            phase: round(figure(values), 4) if values else None for phase, values in phases.items()
        }
        for name, figure in figures.items()
    }


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


# --- CPU per process -------------------------------------------------------------------


@dataclass
class CpuSnapshot:
    at: float
    ticks: dict[str, int]
    machine: int
    own_s: float


def cpu_groups(platform: LocalPlatform) -> dict[str, list[int]]:
    """Process trees to account CPU to: each service, each server. The containers' own
    processes (conmon daemonizes, with runc, the command and podman's `container
    cleanup` under it) land in `other`."""
    servers = platform.servers
    assert servers is not None
    pids = {p.name: p.process.pid for p in platform.processes}
    groups = {name: [pids[name]] for name in SERVICES if name in pids}
    for name in SERVERS:
        groups[name] = [getattr(servers, name).proc.pid]
    return groups


def cpu_snapshot(groups: dict[str, list[int]]) -> CpuSnapshot:
    stats = proc_stats()
    ticks = {name: tree_ticks(pids, stats) for name, pids in groups.items()}
    return CpuSnapshot(time.monotonic(), ticks, machine_ticks(), time.process_time())


def cpu_seconds(a: CpuSnapshot, b: CpuSnapshot) -> dict[str, float]:
    """CPU seconds per group between two snapshots; `bench` is this process (the client
    or docker-py), `other` the rest of the machine (containers, kernel, other load)."""
    used = {name: (b.ticks[name] - a.ticks[name]) / CLK_TCK for name in a.ticks}
    used["bench"] = b.own_s - a.own_s
    machine = (b.machine - a.machine) / CLK_TCK
    used["other"] = max(0.0, machine - sum(used.values()))
    used["machine"] = machine
    used["capacity"] = (b.at - a.at) * (os.cpu_count() or 1)
    return {name: round(value, 2) for name, value in used.items()}


# --- the engine ------------------------------------------------------------------------


@dataclass
class EngineRun:
    """One container straight through the engine: seconds per call, and its exit code."""

    create: float = 0.0
    start: float = 0.0
    wait: float = 0.0
    logs: float = 0.0
    remove: float = 0.0
    total: float = 0.0
    exit_code: int | None = None
    error: str | None = None


@dataclass
class EngineResult:
    runs: list[EngineRun]
    wall_s: float
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def succeeded(self) -> int:
        return sum(r.exit_code == 0 for r in self.runs)


@dataclass(frozen=True)
class Machine:
    """The local provider as the platform knows it (what the daemon sizes jobs by), and
    the image's user (looked up once: a job's container needs no image inspect)."""

    gpus: int
    cpu_count: int | None
    memory_mb: int | None
    image_user: str = ""


def engine_spec(
    machine: Machine, job: JobDir, name: str, command: list[str], gpu: str
) -> ContainerSpec:
    """The daemon's container for a one-GPU job (runner.TaskRun._spec, default policy),
    without its labels."""
    policy = ContainerPolicy()
    user = run_as(policy, machine.image_user)
    env = {"NVIDIA_VISIBLE_DEVICES": gpu, "GPUMARKET_JOB_ID": name}
    if user == NOBODY:
        env["HOME"] = "/tmp"
    return ContainerSpec(
        name=name,
        image=SAMPLE_IMAGE,
        command=command,
        env=env,
        labels={},
        inputs_dir=job.inputs,
        outputs_dir=job.outputs,
        gpu_uuids=[gpu],
        real_gpus=False,
        limits=limits_for(1, machine.gpus, machine.cpu_count, machine.memory_mb, policy.pids_limit),
        user=user,
        runtime=policy.runtime,
        tmp_size_mb=policy.tmp_size_mb,
    )


def run_container(
    containers: Containers,
    machine: Machine,
    work_dir: Path,
    name: str,
    command: list[str],
    gpu: str,
) -> EngineRun:
    """What the daemon asks of the engine for one job (runner.TaskRun), minus the
    platform: a job dir, create, start, wait, the output, remove."""
    run = EngineRun()
    began = time.perf_counter()
    job = create_job_dir(work_dir, name, 0)
    client = containers.client
    container = None
    try:
        spec = engine_spec(machine, job, name, command, gpu)
        mark = time.perf_counter()
        container = client.containers.create(spec.image, **containers.create_arguments(spec))
        run.create, mark = time.perf_counter() - mark, time.perf_counter()
        container.start()
        run.start, mark = time.perf_counter() - mark, time.perf_counter()
        run.exit_code = int(container.wait()["StatusCode"])
        run.wait, mark = time.perf_counter() - mark, time.perf_counter()
        job.log_file.write_bytes(container.logs(stdout=True, stderr=True))
        run.logs, mark = time.perf_counter() - mark, time.perf_counter()
        container.remove(force=True, v=True)
        container = None
        run.remove = time.perf_counter() - mark
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        if container is not None:
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)
        remove_job_dir(job)
    run.total = time.perf_counter() - began
    return run


def run_engine(
    docker_host: str,
    machine: Machine,
    work_dir: Path,
    command: list[str],
    jobs: int,
    groups: dict[str, list[int]],
    console: Console,
    label: str,
) -> EngineResult:
    """`jobs` containers, one per GPU at a time, after one uncounted warm-up."""
    # The daemon's own docker-py client and container arguments.
    containers = Containers(docker_host)
    prefix = f"gpumarket-bench-{secrets.token_hex(4)}"
    gpus = [f"GPU-bench-{n}" for n in range(machine.gpus)]
    try:
        config = containers.client.images.get(SAMPLE_IMAGE).attrs.get("Config") or {}
        machine = replace(machine, image_user=config.get("User") or "")
        warm = run_container(
            containers, machine, work_dir, f"{prefix}-warmup", WARMUP_COMMAND, gpus[0]
        )
        if warm.exit_code != 0:
            raise BenchError(
                f"the engine could not run the container: {warm.error or warm.exit_code}"
            )
        runs: list[EngineRun] = []
        lock = threading.Lock()
        with progress_bar(console) as progress:
            bar = progress.add_task(f"containers through the engine ({label})", total=jobs)

            def one(n: int) -> EngineRun:
                # The GPU only names the environment's value, as the daemon sets it.
                gpu = gpus[n % machine.gpus]
                run = run_container(containers, machine, work_dir, f"{prefix}-{n}", command, gpu)
                with lock:
                    runs.append(run)
                    progress.advance(bar)
                return run

            before = cpu_snapshot(groups)
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=machine.gpus) as pool:
                list(pool.map(one, range(jobs)))
            wall = time.perf_counter() - started
            after = cpu_snapshot(groups)
    finally:
        containers.close()
    return EngineResult(runs, wall, cpu_seconds(before, after))


# --- the platform ----------------------------------------------------------------------


@dataclass
class PlatformResult:
    jobs: list[JobOut]
    first_submit: float
    submit_s: float
    wall_s: float
    timed_out: bool
    cpu: dict[str, float] = field(default_factory=dict)
    # The scheduler's placement passes meanwhile: how many, and their seconds in all.
    passes: int = 0
    passes_s: float = 0.0

    @property
    def done(self) -> list[JobOut]:
        return [j for j in self.jobs if j.status in states.TERMINAL and j.finished_at]

    @property
    def succeeded(self) -> list[JobOut]:
        return [j for j in self.jobs if j.status == states.SUCCEEDED]

    @property
    def span_s(self) -> float | None:
        """First submit to the last job's `finished_at` (the daemon's clock, this machine)."""
        done = self.done
        if not done:
            return None
        return max(j.finished_at.timestamp() for j in done if j.finished_at) - self.first_submit


def job_spec(command: list[str]) -> dict[str, Any]:
    return {
        "image": SAMPLE_IMAGE,
        "command": command,
        "resources": {"gpus": 1},
        "max_duration_s": 120,
    }


def machine_of(gateway_url: str, provider: dict[str, str]) -> Machine:
    """The local daemon's machine: it runs one job per GPU at once."""
    client = Client(gateway_url)
    client.register_or_login(provider["email"], provider["password"], "provider")
    online = [p for p in client.providers() if p.state == "online"]
    if len(online) != 1 or not online[0].gpus:
        raise BenchError(f"expected one local provider online with GPUs, found {len(online)}")
    p = online[0]
    return Machine(len(p.gpus), p.cpu_count, p.memory_mb)


def run_platform(
    client: Client,
    command: list[str],
    jobs: int,
    array: bool,
    timeout: float,
    groups: dict[str, list[int]],
    scheduler_metrics: str,
    console: Console,
) -> PlatformResult:
    """Submits `jobs` jobs and waits until every one has ended (or `timeout` passed)."""
    warm = client.wait(client.submit(job_spec(WARMUP_COMMAND)).id, timeout=timeout)
    if warm.status != states.SUCCEEDED:
        raise BenchError(
            f"the warm-up job ended {warm.status} (exit code {warm.exit_code}): "
            f"{warm.failure_reason or ''}"
        )
    spec = job_spec(command)
    passes_before = placement_passes(scheduler_metrics)
    before = cpu_snapshot(groups)
    first_submit = time.time()
    started = time.perf_counter()
    if array:
        ids = [j.id for j in client.submit_array(template=spec, count=jobs).jobs]
    else:
        with ThreadPoolExecutor(max_workers=SUBMITTERS) as pool:
            ids = list(pool.map(lambda _: client.submit(spec).id, range(jobs)))
    submit_s = time.perf_counter() - started
    # The oldest job not seen ended yet, one at a time (they run in FIFO order): one small
    # request per job and per POLL_S, where listing every job each time would cost the
    # gateway CPU the platform's own work needs.
    pending, ended = list(ids), {}
    deadline = time.monotonic() + timeout
    with progress_bar(console) as progress:
        bar = progress.add_task("jobs through the platform", total=jobs)
        while pending and time.monotonic() < deadline:
            job = client.job(pending[0])
            if job.status in states.TERMINAL and job.finished_at is not None:
                ended[job.id] = job
                pending.pop(0)
                progress.advance(bar)
            else:
                time.sleep(POLL_S)
    wall = time.perf_counter() - started
    after = cpu_snapshot(groups)
    passes_after = placement_passes(scheduler_metrics)
    records = [ended.get(job_id) or client.job(job_id) for job_id in ids]
    return PlatformResult(
        records,
        first_submit,
        submit_s,
        wall,
        bool(pending),
        cpu_seconds(before, after),
        passes=int(passes_after[0] - passes_before[0]),
        passes_s=passes_after[1] - passes_before[1],
    )


def placement_passes(metrics_url: str) -> tuple[float, float]:
    """How many placement passes the scheduler ran so far, and their seconds in all."""
    response = httpx.get(metrics_url, timeout=10, follow_redirects=True)
    response.raise_for_status()
    values = dict.fromkeys(("_count", "_sum"), 0.0)
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        suffix = name.removeprefix(PASS_METRIC)
        if suffix in values:
            values[suffix] = float(value)
    return values["_count"], values["_sum"]


def platform_phases(jobs: list[JobOut], concurrency: int) -> Phases:
    """Per-job phases from the job records (one machine, one clock).

    `finished_to_next_assigned`: the k-th assignment against the (k - concurrency)-th
    finish, while jobs wait in the queue. GPUs are freed when a container exits, before
    its results are uploaded and the job finished, so this is negative when the next job
    got the GPU while the last one still uploaded (the usual case).
    """
    assigned = sorted(j.assigned_at for j in jobs if j.assigned_at)
    finished = sorted(j.finished_at for j in jobs if j.finished_at)
    handoffs = [
        _seconds(finished[k - concurrency], assigned[k])
        for k in range(concurrency, min(len(assigned), len(finished) + concurrency))
    ]
    return {
        "queued_to_assigned": present(_seconds(j.created_at, j.assigned_at) for j in jobs),
        "assigned_to_started": present(_seconds(j.assigned_at, j.started_at) for j in jobs),
        "started_to_finished": present(_seconds(j.started_at, j.finished_at) for j in jobs),
        "assigned_to_accepted": present(_seconds(j.assigned_at, j.accepted_at) for j in jobs),
        "accepted_to_started": present(_seconds(j.accepted_at, j.started_at) for j in jobs),
        "assigned_to_finished": present(_seconds(j.assigned_at, j.finished_at) for j in jobs),
        "finished_to_next_assigned": present(handoffs),
    }


def daemon_phases(log_path: Path, job_ids: set[str]) -> Phases:
    """Per-job times of the daemon's own steps, from the times of its log lines:
    `prepare_create_start` (accepted to the container started: the job dir, inputs, the
    image check, create, start), `run_and_upload` (the container's run, its log stream
    drained, the outputs plan and the uploads), `cleanup` (container and job dir
    removed). Jobs whose lines are missing (the log's wording changed) count for none."""
    marks: dict[str, dict[str, datetime]] = {}
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            job_id = record.get("job_id")
            if job_id not in job_ids:
                continue
            for mark, text in DAEMON_MARKS.items():
                if str(record.get("msg", "")).startswith(text):
                    marks.setdefault(job_id, {})[mark] = datetime.fromisoformat(record["ts"])
    steps = (
        ("prepare_create_start", "accepted", "container_started"),
        ("run_and_upload", "container_started", "uploaded"),
        ("cleanup", "uploaded", "attempt_finished"),
    )
    return {
        name: present(_seconds(m.get(a), m.get(b)) for m in marks.values()) for name, a, b in steps
    }


def failures(jobs: list[JobOut]) -> list[dict[str, Any]]:
    return [
        {
            "id": j.id,
            "status": j.status,
            "exit_code": j.exit_code,
            "reason": j.failure_reason,
        }
        for j in jobs
        if j.status != states.SUCCEEDED
    ]


# --- the run ---------------------------------------------------------------------------


def default_timeout(jobs: int) -> float:
    """Seconds for every platform job to end: generous (a job takes well under 1 s)."""
    return 120 + 2 * jobs


def run_containers_bench(
    platform: LocalPlatform,
    accounts: dict[str, dict[str, str]],
    jobs: int,
    command: list[str],
    array: bool,
    timeout: float | None,
    console: Console,
) -> dict[str, Any]:
    """Runs both parts on the started platform; prints a table, then the JSON line."""
    servers = platform.servers
    assert servers is not None
    machine = machine_of(platform.gateway_url, accounts["provider"])
    concurrency = machine.gpus
    groups = cpu_groups(platform)
    work_dir = platform.data_dir / "bench-engine"

    def engine(label: str) -> EngineResult:
        return run_engine(
            servers.podman.docker_host, machine, work_dir, command, jobs, groups, console, label
        )

    engine_before = engine("before")
    requester = accounts["requester"]
    with Client(platform.gateway_url) as client:
        client.register_or_login(requester["email"], requester["password"], "requester")
        on_platform = run_platform(
            client,
            command,
            jobs,
            array,
            timeout or default_timeout(jobs),
            groups,
            f"http://127.0.0.1:{platform.ports['scheduler']}/metrics",
            console,
        )
    engine_after = engine("after")

    engine_runs = engine_before.runs + engine_after.runs
    engine_ok = engine_before.succeeded + engine_after.succeeded
    engine_wall = engine_before.wall_s + engine_after.wall_s
    engine_rate = engine_ok / engine_wall
    succeeded = on_platform.succeeded
    span = on_platform.span_s
    platform_rate = len(succeeded) / span if span else 0.0
    engine_errors = [r.error or f"exit code {r.exit_code}" for r in engine_runs if r.exit_code != 0]
    result: dict[str, Any] = {
        "jobs": jobs,
        "concurrency": concurrency,
        "command": command,
        "submit": "array" if array else f"one per request, {SUBMITTERS} threads",
        "succeeded": len(succeeded),
        "failed": jobs - len(succeeded),
        "failures": failures(on_platform.jobs)[:FAILURES_SHOWN],
        "timed_out": on_platform.timed_out,
        "platform_jobs_per_s": round(platform_rate, 3),
        "engine_jobs_per_s": round(engine_rate, 3),
        "ratio": round(platform_rate / engine_rate, 3) if engine_rate else None,
        "platform_span_s": round(span, 2) if span else None,
        "platform_submit_s": round(on_platform.submit_s, 2),
        "scheduler_passes": on_platform.passes,
        "scheduler_pass_mean_s": round(on_platform.passes_s / on_platform.passes, 4)
        if on_platform.passes
        else None,
        "engine_wall_s": round(engine_wall, 2),
        "engine_before_jobs_per_s": round(engine_before.succeeded / engine_before.wall_s, 3),
        "engine_after_jobs_per_s": round(engine_after.succeeded / engine_after.wall_s, 3),
        "engine_failed": len(engine_errors),
        "engine_errors": engine_errors[:FAILURES_SHOWN],
        **summary(platform_phases(succeeded, concurrency), "platform_phases"),
        **summary(
            daemon_phases(platform.log_dir / "provider_daemon.log", {j.id for j in succeeded}),
            "daemon_phases",
        ),
        **summary(
            {
                name: [getattr(r, name) for r in engine_runs if r.exit_code == 0]
                for name in ("create", "start", "wait", "logs", "remove", "total")
            },
            "engine_phases",
        ),
        # Per GPU and job: how long the slot is taken, on each side.
        "platform_s_per_job_per_gpu": round(concurrency / platform_rate, 4)
        if platform_rate
        else None,
        "engine_s_per_job_per_gpu": round(concurrency / engine_rate, 4) if engine_rate else None,
        "cpu_s": {
            "platform": on_platform.cpu,
            "engine_before": engine_before.cpu,
            "engine_after": engine_after.cpu,
        },
    }
    print_table(result, console)
    print(json.dumps(result), flush=True)
    return result


def print_table(result: dict[str, Any], console: Console) -> None:
    figures = Table(
        title=f"{result['jobs']} x {shlex.join(result['command'])}: the platform vs the "
        f"engine, {result['concurrency']} at once"
    )
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    for key, value in result.items():
        if not isinstance(value, dict | list) and key != "command":
            figures.add_row(key, "-" if value is None else str(value))
    console.print(figures)
    phases = Table(title="per job (seconds)")
    phases.add_column("phase")
    for column in ("p50", "mean", "max"):
        phases.add_column(column, justify="right")
    for part in ("platform", "daemon", "engine"):
        for phase in result[f"{part}_phases_p50_s"]:
            row = (result[f"{part}_phases_{c}_s"][phase] for c in ("p50", "mean", "max"))
            phases.add_row(f"{part}: {phase}", *("-" if v is None else f"{v:.3f}" for v in row))
    console.print(phases)
    cpu = Table(title="CPU seconds")
    cpu.add_column("part")
    cpu.add_column("machine / capacity", justify="right")
    cpu.add_column("busiest")
    for part, used in result["cpu_s"].items():
        busiest = sorted(
            ((n, v) for n, v in used.items() if n not in ("machine", "capacity")),
            key=lambda item: -item[1],
        )
        cpu.add_row(
            part,
            f"{used['machine']} / {used['capacity']}",
            ", ".join(f"{n} {v}" for n, v in busiest[:5]),
        )
    console.print(cpu)
    for part, used in result["cpu_s"].items():
        if used["machine"] > BUSY * used["capacity"]:
            console.print(
                f"[yellow]the CPUs were {used['machine'] / used['capacity']:.0%} busy during "
                f"{part}[/] (other: {used['other']} s): other load may skew the figures"
            )
    for failure in result["failures"]:
        console.print(f"[yellow]job {failure['id']} {failure['status']}:[/] {failure['reason']}")
    for error in result["engine_errors"]:
        console.print(f"[yellow]engine container failed:[/] {error}")
