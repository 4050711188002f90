"""The whole marketplace on one machine: servers, migrations, services, a provider daemon.

`gpumarket up` and the integration tests both run the platform through this module, so
what the tests prove is what a developer runs.
"""

import json
import logging
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from urllib.parse import urlsplit

import httpx

from common.discovery import consul_name
from gpumarket.localstack.nats import NatsServer, start_nats
from gpumarket.localstack.podman import PodmanService, ensure_sample_image, start_podman
from gpumarket.localstack.postgres import PostgresServer, start_postgres
from gpumarket.localstack.process import free_port, spawn, stop_process, wait_until
from gpumarket.localstack.s3 import S3Server, start_s3
from migrations.runner import upgrade

log = logging.getLogger(__name__)

SAMPLE_IMAGE = "localhost/gpumarket-sample:latest"
DEFAULT_SIMULATED_GPUS = "RTX 4090:2"


@dataclass
class Servers:
    nats: NatsServer
    postgres: PostgresServer
    s3: S3Server
    podman: PodmanService


@dataclass
class ServiceProcess:
    name: str
    process: Popen
    health_url: str | None = None


def service_argv(name: str, port: int) -> list[str]:
    """How an HTTP service of the platform runs: its app factory under uvicorn."""
    return [
        sys.executable, "-m", "uvicorn", f"{name}.app:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
    ]  # fmt: skip


@dataclass
class LocalPlatform:
    data_dir: Path
    gateway_port: int = 8000
    simulate: str = DEFAULT_SIMULATED_GPUS
    servers: Servers | None = None
    # Servers handed in (by the tests) are not ours to stop.
    owns_servers: bool = True
    processes: list[ServiceProcess] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    # Extra GPUMARKET_* settings for every service (the tests shorten some delays).
    settings: dict[str, str] = field(default_factory=dict)
    # Scheduler replicas, each with its own HTTP port, all on the same durable consumers.
    schedulers: int = 1

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    def start_servers(self) -> Servers:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        started: list = []
        try:
            for start in (
                lambda: start_nats(self.data_dir / "nats", port=self.port("nats")),
                lambda: start_postgres(self.data_dir / "postgres", port=self.port("postgres")),
                lambda: start_s3(self.data_dir / "s3", port=self.port("s3")),
                lambda: start_podman(self.data_dir / "podman"),
            ):
                started.append(start())
        except BaseException:
            _stop_servers(reversed(started))
            raise
        self.servers = Servers(*started)
        return self.servers

    def port(self, name: str) -> int:
        """The port of a part, the same on every start with this data dir.

        A joined daemon's saved config and a developer's bookmarks name these ports, so a
        restart must not move them.
        """
        path = self.data_dir / "ports.json"
        if not self.ports and path.exists():
            self.ports.update(json.loads(path.read_text()))
        if name not in self.ports:
            self.ports[name] = free_port()
            path.write_text(json.dumps(self.ports, indent=2))
        return self.ports[name]

    def prepare(self) -> None:
        """Migrations and the sample image: what must exist before the services start."""
        assert self.servers is not None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        upgrade(self.servers.postgres.url)
        ensure_sample_image(self.servers.podman)

    def _internal_token(self) -> str:
        path = self.data_dir / "internal-token"
        if not path.exists():
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def service_env(self) -> dict[str, str]:
        assert self.servers is not None
        s = self.servers
        return {
            **os.environ,
            "GPUMARKET_DEV_MODE": "true",
            "GPUMARKET_DATABASE_URL": s.postgres.url,
            "GPUMARKET_NATS_URL": s.nats.url,
            "GPUMARKET_INTERNAL_TOKEN": self._internal_token(),
            "GPUMARKET_S3_ENDPOINT": s.s3.endpoint,
            "GPUMARKET_S3_ACCESS_KEY": s.s3.access_key,
            "GPUMARKET_S3_SECRET_KEY": s.s3.secret_key,
            "GPUMARKET_S3_REGION": s.s3.region,
            "GPUMARKET_AUTH_URL": f"http://127.0.0.1:{self.ports['auth_service']}",
            "GPUMARKET_STORAGE_URL": f"http://127.0.0.1:{self.ports['storage_service']}",
            "GPUMARKET_REGISTRY_URL": f"http://127.0.0.1:{self.ports['provider_registry']}",
            "GPUMARKET_HTTP_PORT": str(self.ports["scheduler"]),
            **self.settings,
        }

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], port: int | None) -> None:
        log_path = self.log_dir / f"{name}.log"
        process = spawn(name, argv, log_path, env=env)
        health = f"http://127.0.0.1:{port}/healthz" if port else None
        self.processes.append(ServiceProcess(name, process, health))

    @property
    def scheduler_names(self) -> list[str]:
        """scheduler, scheduler-2, ...: the first keeps the name (and port) of a single one."""
        return ["scheduler"] + [f"scheduler-{n}" for n in range(2, self.schedulers + 1)]

    def start_services(self) -> None:
        for name in ("auth_service", "storage_service", "provider_registry", "scheduler"):
            self.port(name)
        self.ports["gateway"] = self.gateway_port
        env = self.service_env()
        for name in ("auth_service", "storage_service", "provider_registry", "gateway"):
            self._spawn(name, service_argv(name, self.ports[name]), env, self.ports[name])
        for name in self.scheduler_names:
            port = self.port(name)
            scheduler_env = {**env, "GPUMARKET_HTTP_PORT": str(port)}
            self._spawn(name, [sys.executable, "-m", "scheduler.worker"], scheduler_env, port)
        for proc in self.processes:
            self._wait_healthy(proc)

    def _wait_healthy(self, proc: ServiceProcess, timeout: float = 60.0) -> None:
        url = proc.health_url
        if url is None:
            return
        wait_until(
            lambda: httpx.get(url, timeout=2).status_code == 200,
            timeout,
            proc.name,
            proc.process,
            interval=0.2,
        )

    def start_provider(self, join_token: str | None) -> ServiceProcess:
        """Runs the local provider daemon: joins with the token, or resumes its saved config."""
        assert self.servers is not None
        config = self.data_dir / "provider.json"
        metrics_port = self.port("provider_daemon")
        # Like on a stranger's machine: no database, storage or internal credentials.
        env = {**os.environ, "DOCKER_HOST": self.servers.podman.docker_host}
        common = ["--config", str(config), "--metrics-port", str(metrics_port)]
        if config.exists():
            argv = [sys.executable, "-m", "provider_daemon", "run", *common]
        else:
            if join_token is None:
                raise ValueError("a join token is needed for the first start")
            argv = [
                sys.executable,
                "-m",
                "provider_daemon",
                "join",
                "--token",
                join_token,
                "--api",
                self.gateway_url,
                "--name",
                "local-dev",
                "--simulate",
                self.simulate,
                "--work-dir",
                str(self.data_dir / "provider-work"),
                "--docker-host",
                self.servers.podman.docker_host,
                # No registry is reachable: the machine check uses the local sample image.
                "--check-image",
                SAMPLE_IMAGE,
                *common,
            ]
        self._spawn("provider_daemon", argv, env, metrics_port)
        proc = self.processes[-1]
        self._wait_healthy(proc)
        return proc

    @property
    def scrape_targets_path(self) -> Path:
        return self.data_dir / "prometheus-targets.json"

    def write_scrape_targets(self) -> Path:
        """Every running part's /metrics as a Prometheus file_sd list, with `job` the name
        it has in Consul under compose (scheduler replicas share one), so the dashboards
        and alert rules read the local stack as they read the real one."""
        groups = []
        for proc in self.processes:
            if proc.health_url is None:
                continue
            name = "scheduler" if proc.name.startswith("scheduler") else proc.name
            address = urlsplit(proc.health_url).netloc
            groups.append({"targets": [address], "labels": {"job": consul_name(name)}})
        # Prometheus watches the file: it must never see half of it.
        partial = self.scrape_targets_path.with_suffix(".partial")
        partial.write_text(json.dumps(groups, indent=2))
        partial.replace(self.scrape_targets_path)
        return self.scrape_targets_path

    def stop(self) -> None:
        """Stops everything in reverse order: the daemon first, so it removes its containers."""
        for proc in reversed(self.processes):
            stop_process(proc.process, timeout=20)
        self.processes.clear()
        if self.servers is not None and self.owns_servers:
            s = self.servers
            _stop_servers([s.podman, s.s3, s.nats, s.postgres])
            self.servers = None


def _stop_servers(servers) -> None:  # type: ignore[no-untyped-def]
    for server in servers:
        try:
            server.stop()
        except Exception:
            log.exception("stopping a server failed")
