"""Real servers on loopback for `gpumarket up` and the tests: NATS, PostgreSQL, S3, Podman."""

from .nats import NatsServer, start_nats
from .podman import (
    CONTAINERS_CONF,
    PodmanService,
    docker_ulimits,
    ensure_sample_image,
    podman_env,
    start_podman,
)
from .postgres import PostgresServer, start_postgres
from .process import ServerError, free_port, spawn, stop_process, wait_for_port
from .s3 import S3Server, start_s3

__all__ = [
    "CONTAINERS_CONF",
    "NatsServer",
    "PodmanService",
    "PostgresServer",
    "S3Server",
    "ServerError",
    "docker_ulimits",
    "ensure_sample_image",
    "free_port",
    "podman_env",
    "spawn",
    "start_nats",
    "start_podman",
    "start_postgres",
    "start_s3",
    "stop_process",
    "wait_for_port",
]
