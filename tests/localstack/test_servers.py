"""Real checks of the local servers: each protocol is exercised end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
import docker
import httpx
import nats
import pytest
from minio import Minio
from minio.error import S3Error
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gpumarket.localstack.nats import NatsServer
from gpumarket.localstack.podman import PodmanService, docker_ulimits, ensure_sample_image
from gpumarket.localstack.postgres import PostgresServer, start_postgres
from gpumarket.localstack.process import ServerError, spawn, stop_process, wait_for_port
from gpumarket.localstack.s3 import S3Server

REPO = Path(__file__).resolve().parents[2]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _gone(pid: int) -> bool:
    fields = _stat(pid)
    return fields is None or fields[0] in ("Z", "X")  # zombies wait for a reaper, yet are dead


def _live_group_members(pgid: int) -> list[int]:
    pids = (int(p) for p in os.listdir("/proc") if p.isdigit())
    return [p for p in pids if (f := _stat(p)) and f[2] == str(pgid) and f[0] not in "ZX"]


def _wait_for(condition: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- process plumbing -------------------------------------------------------------------


@pytest.mark.parametrize("user", [None, "nobody"])
def test_child_dies_with_killed_parent(tmp_path: Path, user: str | None) -> None:
    if user is not None and os.geteuid() != 0:
        pytest.skip("switching users needs root")
    script = textwrap.dedent(
        """
        import sys, time, pathlib
        from gpumarket.localstack.process import spawn
        user = sys.argv[2] or None
        p = spawn("sleeper", ["sleep", "300"], pathlib.Path(sys.argv[1]), user=user)
        print(p.pid, flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "sleep.log"), user or ""],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert not _gone(child)
    if user is not None:
        assert Path(f"/proc/{child}").stat().st_uid != 0
    parent.kill()
    parent.wait()
    assert _wait_for(lambda: _gone(child)), "PR_SET_PDEATHSIG did not take the child down"


def test_spawn_from_short_lived_thread_survives_thread(tmp_path: Path) -> None:
    # PDEATHSIG fires when the forking *thread* exits; spawn must shield callers from that.
    procs: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(
        target=lambda: procs.append(spawn("t", ["sleep", "300"], tmp_path / "t.log"))
    )
    thread.start()
    thread.join()
    time.sleep(0.3)
    try:
        assert procs[0].poll() is None
    finally:
        stop_process(procs[0])


def test_wait_for_port_reports_log_tail(tmp_path: Path) -> None:
    proc = spawn("boom", ["sh", "-c", "echo boom-happened; exit 3"], tmp_path / "boom.log")
    with pytest.raises(ServerError, match="boom-happened"):
        wait_for_port("127.0.0.1", 1, timeout=10, proc=proc)


def test_stop_process_kills_term_ignoring_group(tmp_path: Path) -> None:
    proc = spawn(
        "stubborn", ["sh", "-c", "trap '' TERM; sleep 300 & wait"], tmp_path / "stubborn.log"
    )
    time.sleep(0.2)
    started = time.monotonic()
    stop_process(proc, timeout=0.5)
    assert proc.returncode is not None
    assert time.monotonic() - started < 5
    assert _wait_for(lambda: not _live_group_members(proc.pid)), "background `sleep` survived"


# --- NATS ---------------------------------------------------------------------------------


async def test_nats_jetstream_publish_and_pull(nats_server: NatsServer) -> None:
    assert nats_server.url.startswith("nats://127.0.0.1:")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        stream = f"LS{uuid.uuid4().hex[:8].upper()}"
        await js.add_stream(name=stream, subjects=[f"{stream}.>"])
        ack = await js.publish(f"{stream}.job", b"hello")
        assert ack.stream == stream and ack.seq == 1
        sub = await js.pull_subscribe(f"{stream}.job", durable="worker")
        (msg,) = await sub.fetch(1, timeout=5)
        assert msg.data == b"hello"
        await msg.ack()
        await js.delete_stream(stream)
    finally:
        await nc.close()


# --- PostgreSQL -----------------------------------------------------------------------------


async def test_postgres_asyncpg_and_sqlalchemy(postgres_server: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres_server.dsn)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        who = await conn.fetchrow("SELECT current_user AS u, current_database() AS d")
        assert (who["u"], who["d"]) == ("gpumarket", "gpumarket")
    finally:
        await conn.close()
    engine = create_async_engine(postgres_server.url)
    try:
        async with engine.connect() as sa:
            assert (await sa.execute(text("SELECT 2"))).scalar() == 2
    finally:
        await engine.dispose()


async def test_postgres_wrong_password_refused(postgres_server: PostgresServer) -> None:
    bad = postgres_server.dsn.replace(postgres_server.password, "not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(bad)


async def test_postgres_restart_keeps_data(tmp_path: Path) -> None:
    first = start_postgres(tmp_path / "pg", fsync=False)
    try:
        conn = await asyncpg.connect(first.dsn)
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('still here')")
        await conn.close()
    finally:
        first.stop()
    second = start_postgres(tmp_path / "pg", fsync=False)
    try:
        assert second.password == first.password
        conn = await asyncpg.connect(second.dsn)
        assert await conn.fetchval("SELECT v FROM kept") == "still here"
        await conn.close()
    finally:
        second.stop()


# --- S3 -------------------------------------------------------------------------------------


def test_s3_presigned_roundtrip_and_auth_enforced(s3_server: S3Server) -> None:
    assert s3_server.endpoint.startswith("http://127.0.0.1:")
    assert s3_server.region == "us-east-1"
    client = s3_server.client()
    bucket = f"ls-{uuid.uuid4().hex[:12]}"
    client.make_bucket(bucket)
    key = "jobs/1/inputs/data.bin"
    body = os.urandom(70_000)

    put_url = client.presigned_put_object(bucket, key, expires=timedelta(minutes=5))
    assert httpx.put(put_url, content=body).status_code == 200
    get_url = client.presigned_get_object(bucket, key, expires=timedelta(minutes=5))
    got = httpx.get(get_url)
    assert got.status_code == 200 and got.content == body

    plain = f"{s3_server.endpoint}/{bucket}/{key}"
    assert httpx.get(plain).status_code == 403
    assert httpx.put(f"{plain}.evil", content=b"x").status_code == 403
    assert httpx.get(f"{s3_server.endpoint}/").status_code == 403
    tampered = get_url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert httpx.get(tampered).status_code == 403
    # A URL presigned for GET does not authorize a PUT to the same key.
    assert httpx.put(get_url, content=b"overwrite").status_code == 403

    wrong = Minio(
        s3_server.endpoint.removeprefix("http://"),
        access_key=s3_server.access_key,
        secret_key="wrong-secret-key",
        secure=False,
        region=s3_server.region,
    )
    with pytest.raises(S3Error):
        wrong.list_buckets()


# --- Podman ---------------------------------------------------------------------------------


def test_podman_job_container_like_the_daemon(
    podman_service: PodmanService, sample_image: str, tmp_path: Path
) -> None:
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    inputs.mkdir()
    outputs.mkdir()
    (inputs / "x").write_text("payload\n")
    # tmp dirs are 0700 root: uid 65534 in the container must be able to read/write them.
    inputs.chmod(0o755)
    outputs.chmod(0o777)
    script = (
        "cat /inputs/x > /outputs/y; echo hi; "
        "touch /inputs/nope 2>/dev/null && echo inputs-writable; "
        "touch /nope 2>/dev/null && echo root-writable; "
        "echo tmp > /tmp/t && cat /tmp/t; "
        "ls /sys/class/net; id -u; ulimit -n; echo to-stderr >&2"
    )
    client = docker.DockerClient(base_url=podman_service.docker_host)
    container = client.containers.create(
        sample_image,
        ["sh", "-c", script],
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        ulimits=docker_ulimits(nofile=1024, nproc=1024),
        volumes={
            str(inputs): {"bind": "/inputs", "mode": "ro"},
            str(outputs): {"bind": "/outputs", "mode": "rw"},
        },
        user="65534:65534",
        read_only=True,
        tmpfs={"/tmp": "rw,size=16m"},
        mem_limit="256m",
        pids_limit=256,
        labels={"gpumarket.test": "1"},
    )
    try:
        container.start()
        result = container.wait(timeout=60)
        stdout = container.logs(stdout=True, stderr=False).decode()
        stderr = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
        client.close()
    assert result["StatusCode"] == 0, (stdout, stderr)
    assert stdout.split() == ["hi", "tmp", "lo", "65534", "1024"]
    assert "to-stderr" in stderr
    assert (outputs / "y").read_text() == "payload\n"


def test_podman_exit_code_and_root_user(podman_service: PodmanService, sample_image: str) -> None:
    client = docker.DockerClient(base_url=podman_service.docker_host)
    container = client.containers.create(
        sample_image,
        ["sh", "-c", "seq 3 | wc -l; sha256sum /etc/passwd >/dev/null; exit 3"],
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
    )
    try:
        container.start()
        assert container.wait(timeout=60)["StatusCode"] == 3
        assert container.logs().decode().strip() == "3"
    finally:
        container.remove(force=True)
        client.close()


def test_sample_image_is_reused(podman_service: PodmanService, sample_image: str) -> None:
    image = podman_service.client().images.get(sample_image)
    assert image.attrs["Config"]["Cmd"] == ["/bin/sh"]
    assert ensure_sample_image(podman_service) == sample_image
    assert podman_service.client().images.get(sample_image).id == image.id


def test_podman_cli_env(podman_service: PodmanService) -> None:
    info = subprocess.run(
        ["podman", "info", "--format", "{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}}"],
        env={**os.environ, **podman_service.env},
        capture_output=True,
        text=True,
        check=True,
    )
    assert info.stdout.split() == ["runc", "cgroupfs"]
