"""All local servers together, for `gpumarket up` (one data dir, one stop)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .nats import NatsServer, start_nats
from .podman import PodmanService, start_podman
from .postgres import PostgresServer, start_postgres
from .s3 import S3Server, start_s3


@dataclass
class LocalStack:
    nats: NatsServer
    postgres: PostgresServer
    s3: S3Server
    podman: PodmanService | None

    def stop(self) -> None:
        """Stop everything, in reverse start order; keeps going past individual failures."""
        for server in (self.podman, self.s3, self.postgres, self.nats):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()


def start_stack(
    data_dir: Path,
    *,
    podman: bool = True,
    fsync: bool = True,
    buckets: Sequence[str] = (),
) -> LocalStack:
    """Start NATS, PostgreSQL, S3 (and podman) with state under data_dir/<server>.

    Reusing the same data_dir keeps the database, streams and objects. Ports are fresh each
    time; read them from the returned objects.
    """
    started: list[NatsServer | PostgresServer | S3Server | PodmanService] = []
    try:
        nats = start_nats(data_dir / "nats")
        started.append(nats)
        pg = start_postgres(data_dir / "postgres", fsync=fsync)
        started.append(pg)
        s3 = start_s3(data_dir / "s3", buckets=buckets)
        started.append(s3)
        pod = start_podman(data_dir / "podman") if podman else None
    except BaseException:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.stop()
        raise
    return LocalStack(nats, pg, s3, pod)
