"""README command 1: `gpumarket up`, run as a user runs it, stopped with SIGTERM."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from gpumarket.client import Client
from gpumarket.localstack.process import free_port


def start_up(data_dir: Path, port: int, *args: str) -> tuple[subprocess.Popen, Path]:
    out = data_dir.parent / f"up-{time.monotonic_ns()}.out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpumarket.cli",
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            *args,
        ],
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, out


def wait_for_text(proc: subprocess.Popen, out: Path, text: str, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = out.read_text(errors="replace")
        if text in content:
            return content
        if proc.poll() is not None:
            pytest.fail(f"gpumarket up exited ({proc.returncode}) before {text!r}:\n{content}")
        time.sleep(0.2)
    pytest.fail(f"no {text!r} within {timeout}s:\n{out.read_text(errors='replace')}")


def processes_using(data_dir: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if str(data_dir) in cmdline:
            found.append(cmdline)
    return found


def stop(proc: subprocess.Popen, data_dir: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    assert processes_using(data_dir) == []


def test_up_runs_sample_job_stops_cleanly_and_restarts_with_its_state(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    proc, out = start_up(data_dir, port)
    try:
        wait_for_text(proc, out, "ready")
        text = wait_for_text(proc, out, "sample job result")
        assert "sample job result: succeeded exit_code=0" in text
        assert "HELLO FROM THE GPU MARKETPLACE" in text
        assert Client(f"http://127.0.0.1:{port}").http.get("/docs").status_code == 200
        # Prometheus can scrape every part by the names they have in compose.
        targets = json.loads((data_dir / "prometheus-targets.json").read_text())
        jobs = {group["labels"]["job"] for group in targets}
        assert jobs == {
            "gateway",
            "auth-service",
            "storage-service",
            "provider-registry",
            "scheduler",
            "provider-daemon",
        }
        for group in targets:
            [address] = group["targets"]
            assert httpx.get(f"http://{address}/metrics", follow_redirects=True).status_code == 200
    finally:
        if proc.poll() is None:
            stop(proc, data_dir)

    proc, out = start_up(data_dir, port, "--no-sample")
    try:
        wait_for_text(proc, out, "ready")
        accounts = json.loads((data_dir / "dev-accounts.json").read_text())
        client = Client(f"http://127.0.0.1:{port}")
        client.login(accounts["requester"]["email"], accounts["requester"]["password"])
        jobs = client.jobs()
        assert [j.status for j in jobs] == ["succeeded"]
        assert client.outputs(jobs[0].id)[0].path == "result.txt"
    finally:
        if proc.poll() is None:
            stop(proc, data_dir)
