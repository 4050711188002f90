"""A daemon killed while its jobs run (a crash, an OOM kill, a power-cut of the daemon
alone) and started again: it follows its jobs' containers to their end, with real podman
and a real daemon process."""

import asyncio
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import docker
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from common.messages import JobEvent, TaskAssignment
from common.subjects import TASKS_STREAM, provider_durable, tasks_subject
from provider_daemon.config import ProviderConfig, save_config
from provider_daemon.containers import LABEL_PROVIDER
from provider_daemon.gpus import simulated_uuid
from tests.provider_daemon.conftest import FakeGateway, StartDaemon, until

SIMULATE = "RTX 4090:2"


async def _consumer_exists(nc: NatsClient, provider_id: str) -> bool:
    try:
        await nc.jetstream().consumer_info(TASKS_STREAM, provider_durable(provider_id))
    except Exception:
        return False
    return True


async def test_a_restarted_daemon_follows_its_running_job_to_the_end(
    start_daemon: StartDaemon,
    gateway: FakeGateway,
    nc: NatsClient,
    podman_service: Any,
    sample_image: str,
    docker_client: docker.DockerClient,
    tmp_path: Path,
) -> None:
    provider_id, machine_id = uuid.uuid4().hex, str(uuid.uuid4())
    config = ProviderConfig(
        api_url=gateway.url,
        machine_id=machine_id,
        name="crashing-machine",
        simulate=SIMULATE,
        work_dir=tmp_path / "work",
        docker_host=podman_service.docker_host,
        provider_id=provider_id,
        credential=gateway.credential,
        check_image=sample_image,
        nats_url=nc.connected_url.geturl() if nc.connected_url else "",
        heartbeat_interval_s=0.3,
    )
    config_path = tmp_path / "provider.json"
    save_config(config, config_path)
    events: list[JobEvent] = []

    async def collect(msg: Msg) -> None:
        events.append(JobEvent.model_validate_json(msg.data))

    sub = await nc.subscribe(f"events.{provider_id}.>", cb=collect)
    first = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "provider_daemon", "run", "--config", str(config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            if await _consumer_exists(nc, provider_id):
                break
            await asyncio.sleep(0.1)
        task = TaskAssignment(
            job_id=f"job-{uuid.uuid4().hex[:12]}",
            attempt=3,
            image=sample_image,
            command=[
                "sh",
                "-c",
                "echo before; sleep 6; echo after; echo result > /outputs/r.txt; exit 7",
            ],
            gpu_uuids=[simulated_uuid(machine_id, 1)],
            max_duration_s=120,
        )
        await nc.jetstream().publish(tasks_subject(provider_id), task.model_dump_json().encode())
        await until(
            lambda: any(e.type == "started" and e.job_id == task.job_id for e in events),
            60,
            "the job started",
        )
        await asyncio.sleep(1)  # "before" is out
        # The daemon dies at once, without a word: its container must not.
        first.send_signal(signal.SIGKILL)
        await asyncio.wait_for(first.wait(), 10)
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    containers = docker_client.containers.list(filters={"label": f"{LABEL_PROVIDER}={provider_id}"})
    assert len(containers) == 1 and containers[0].status == "running"

    running = await start_daemon(provider_id=provider_id, machine_id=machine_id, simulate=SIMULATE)
    finished = await running.finished(task.job_id, within=60)
    await sub.unsubscribe()
    assert (finished.attempt, finished.outcome, finished.exit_code) == (3, "exited", 7)
    # Nothing was reported lost or run twice: one start (said again), one end.
    assert [e.type for e in events if e.job_id == task.job_id].count("finished") == 1
    # The stored log is whole; the live stream went on where the first daemon stopped.
    assert gateway.logs[(task.job_id, 3)] == b"before\nafter\n"
    assert running.log_lines(task.job_id) == ["after"]
    assert gateway.uploads[(task.job_id, 3, "r.txt")] == b"result\n"
    assert finished.started_at is not None
    assert (finished.ended_at - finished.started_at).total_seconds() >= 6
    # No orphan container, no leftover job directory.
    left = docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_PROVIDER}={provider_id}"}
    )
    assert left == []
    assert list((tmp_path / "work" / "jobs").iterdir()) == []


async def test_a_job_whose_files_are_gone_is_reported_lost(
    start_daemon: StartDaemon,
    docker_client: docker.DockerClient,
    sample_image: str,
    tmp_path: Path,
) -> None:
    provider_id = uuid.uuid4().hex
    stray = tmp_path / "work" / "jobs" / "job-gone-2"
    stray.mkdir(parents=True)
    (stray / "job.log").write_text("from a run long ago\n")
    leftover = await asyncio.to_thread(
        docker_client.containers.run,
        sample_image,
        ["sleep", "60"],
        detach=True,
        network_mode="none",
        labels={LABEL_PROVIDER: provider_id, "gpumarket.job_id": "job-x", "gpumarket.attempt": "1"},
    )
    running = await start_daemon(provider_id=provider_id)
    finished = await running.finished("job-x")
    assert finished.outcome == "infrastructure" and "restarted" in (finished.reason or "")
    remaining = await asyncio.to_thread(docker_client.containers.list, all=True)
    assert leftover.id not in {c.id for c in remaining}
    assert not stray.exists()
