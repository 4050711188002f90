"""The `provider-daemon` command as a GPU owner runs it: a separate process."""

import asyncio
import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from common.messages import Heartbeat
from provider_daemon.errors import NvmlUnavailable
from provider_daemon.gpus import NvmlGpus
from tests.provider_daemon.conftest import FakeGateway, until


async def start_cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "provider_daemon",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await start_cli(*args, env=env)
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stderr.decode()


def human_lines(stderr: str) -> list[str]:
    """stderr without the JSON log lines."""
    return [line for line in stderr.splitlines() if line and not line.startswith("{")]


class TestCliErrors:
    async def test_no_nvml_and_no_simulate(self, tmp_path: Path) -> None:
        try:
            NvmlGpus().close()
            pytest.skip("this machine has a working NVIDIA driver")
        except NvmlUnavailable:
            pass
        code, stderr = await run_cli(
            "join", "--token", "t", "--api", "http://127.0.0.1:9",
            "--config", str(tmp_path / "p.json"),
        )  # fmt: skip
        assert code != 0
        assert "Traceback" not in stderr
        (line,) = human_lines(stderr)
        assert line.startswith("provider-daemon: NVML not available")
        assert line.endswith("and --simulate not given")

    async def test_refused_join_shows_the_servers_detail(
        self, gateway: FakeGateway, podman_service: Any, sample_image: str, tmp_path: Path
    ) -> None:
        config = tmp_path / "p.json"
        code, stderr = await run_cli(
            "join", "--token", "expired-token", "--api", gateway.url,
            "--simulate", "RTX 4090:1", "--docker-host", podman_service.docker_host,
            "--check-image", sample_image, "--config", str(config),
        )  # fmt: skip
        assert code == 1
        assert "Traceback" not in stderr
        assert human_lines(stderr) == [
            "provider-daemon: join failed: join token expired (HTTP 403)"
        ]
        assert not config.exists()

    async def test_run_without_a_config(self, tmp_path: Path) -> None:
        code, stderr = await run_cli(
            "run", env={"GPUMARKET_PROVIDER_CONFIG": str(tmp_path / "none.json")}
        )
        assert code == 1
        (line,) = human_lines(stderr)
        assert "provider-daemon join" in line


class TestJoinAndRun:
    async def test_join_saves_config_runs_and_stops_on_signals(
        self,
        gateway: FakeGateway,
        podman_service: Any,
        sample_image: str,
        nc: NatsClient,
        tmp_path: Path,
    ) -> None:
        config = tmp_path / "conf" / "provider.json"
        beats: list[Heartbeat] = []

        async def on_beat(msg: Msg) -> None:
            beats.append(Heartbeat.model_validate_json(msg.data))

        sub = await nc.subscribe("heartbeats.*", cb=on_beat)
        joins_before = len(gateway.joins)
        proc = await start_cli(
            "join", "--token", "good-token", "--api", gateway.url,
            "--name", "rig-7", "--region", "eu-west",
            "--simulate", "RTX 4090:2", "--price", "RTX 4090=0.8",
            "--label", "tier=3", "--check-image", sample_image,
            "--work-dir", str(tmp_path / "work"), "--config", str(config),
            env={"DOCKER_HOST": podman_service.docker_host},
        )  # fmt: skip
        try:
            await until(lambda: config.exists(), 30, "the saved config")
            saved = json.loads(config.read_text())
            await until(
                lambda: any(b.provider_id == saved["provider_id"] for b in beats), 30, "a beat"
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stderr.decode()
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        assert saved["docker_host"] == podman_service.docker_host
        assert saved["credential"] == gateway.credential
        assert saved["prices"] == {"RTX 4090": 0.8}
        sent = gateway.joins[joins_before]
        assert sent["labels"] == {"tier": "3"}
        assert (sent["name"], sent["region"], sent["simulated"]) == ("rig-7", "eu-west", True)
        assert len(sent["gpus"]) == 2
        # Logs are JSON lines.
        for line in stderr.decode().splitlines():
            assert json.loads(line)["service"] == "provider-daemon"

        # `run` picks up the saved identity and stops as cleanly on SIGINT.
        beats.clear()
        proc = await start_cli("run", "--config", str(config))
        try:
            await until(
                lambda: any(b.provider_id == saved["provider_id"] for b in beats), 30, "a beat"
            )
            # Other daemons of the test session beat on the same server: take ours.
            ours = [b for b in beats if b.provider_id == saved["provider_id"]]
            beat_gpus = {g.uuid for g in ours[-1].gpus}
            assert beat_gpus == {g["uuid"] for g in sent["gpus"]}
        finally:
            proc.send_signal(signal.SIGINT)
            _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stderr.decode()
        await sub.unsubscribe()

        # Joining again keeps this machine's identity (this token is refused, but the
        # request shows which machine asked).
        code, _ = await run_cli(
            "join", "--token", "expired-token", "--api", gateway.url,
            "--simulate", "RTX 4090:2", "--config", str(config),
            env={"DOCKER_HOST": podman_service.docker_host},
        )  # fmt: skip
        assert code == 1
        assert gateway.joins[-1]["machine_id"] == saved["machine_id"]
        assert [g["uuid"] for g in gateway.joins[-1]["gpus"]] == [g["uuid"] for g in sent["gpus"]]
