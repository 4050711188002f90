"""Podman serving the Docker Engine API on a unix socket, for machines without Docker.

The daemon and the tests use the same docker-py code against this socket as against a real
Docker engine. Podman's own settings come from the containers.conf next to this file (see
its comments for why each one is needed); images live in podman's default storage, so they
persist between runs.

Quirks of podman 4.3's Docker API, seen with docker-py on these machines:
- If a create request has any Ulimits, containers.conf's default_ulimits are dropped and the
  missing ones become 1048576, above the hard limit here: runc then fails with "error setting
  rlimit type 7 (or 6): operation not permitted". Always send nofile AND nproc together
  (docker_ulimits() below).
- RLIMIT_NPROC counts every process of the uid on the host (no user namespace), so all
  containers running as 65534 share it, and it is not enforced for uid 0 at all. Use
  pids_limit (cgroup pids controller, works with cgroupfs) for a per-container cap.
- Bind-mounted host dirs keep their host modes: with user "65534:65534" inputs must be
  world-readable and outputs world-writable (or chowned to 65534).
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import ImageNotFound
from docker.types import Ulimit

from .process import ServerError, find_binary, spawn, stop_process, wait_until

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
SAMPLE_IMAGE = "localhost/gpumarket-sample:latest"
_SOCKET_PATH_MAX = 107


def docker_ulimits(nofile: int = 1024, nproc: int = 1024) -> list[Ulimit]:
    """Ulimits for docker-py's containers.create(ulimits=...): both, always (see above)."""
    return [
        Ulimit(name="nofile", soft=nofile, hard=nofile),
        Ulimit(name="nproc", soft=nproc, hard=nproc),
    ]


def podman_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for any `podman` invocation: points CONTAINERS_CONF at the project's file."""
    return dict(os.environ if base is None else base, CONTAINERS_CONF=str(CONTAINERS_CONF))


@dataclass
class PodmanService:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    data_dir: Path
    log_path: Path

    @property
    def docker_host(self) -> str:
        """Value for DOCKER_HOST / docker.DockerClient(base_url=...)."""
        return f"unix://{self.socket_path}"

    @property
    def env(self) -> dict[str, str]:
        """Variables a `podman` CLI call needs (merge into os.environ)."""
        return {"CONTAINERS_CONF": str(CONTAINERS_CONF)}

    def client(self, timeout: int = 120) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)

    def podman(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the podman CLI with this project's settings; raise ServerError on failure."""
        argv = [find_binary("podman") or "podman", *args]
        result = subprocess.run(
            argv, env=podman_env(), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise ServerError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
        return result

    def stop(self) -> None:
        # Containers are not children of the service (conmon daemonizes), so they outlive it,
        # as with dockerd; callers remove their own containers.
        stop_process(self.proc)
        self.socket_path.unlink(missing_ok=True)


def _socket_path(data_dir: Path) -> Path:
    path = data_dir / "podman.sock"
    if len(str(path)) > _SOCKET_PATH_MAX:
        path = Path(tempfile.mkdtemp(prefix="gpumarket-podman-")) / "podman.sock"
    if path.exists():
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
            except OSError:
                path.unlink()  # stale, from a killed run
            else:
                raise ServerError(f"a podman service is already listening on {path}")
    return path


def start_podman(data_dir: Path, timeout: float = 60) -> PodmanService:
    """Start `podman system service` on data_dir/podman.sock; return once the API pings."""
    binary = find_binary("podman")
    if binary is None:
        raise ServerError("podman not found: apt-get install podman runc")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    sock = _socket_path(data_dir)
    log_path = data_dir / "podman.log"
    argv = [binary, "system", "service", "--time=0", f"unix://{sock}"]
    # In its own dir: conmon drops an `oom` marker file in its working directory when a
    # container is killed at its memory limit.
    proc = spawn("podman", argv, log_path, env=podman_env(), cwd=data_dir)
    service = PodmanService(proc, sock, data_dir, log_path)

    def pings() -> bool:
        client = service.client(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    try:
        wait_until(lambda: sock.exists() and pings(), timeout, "podman", proc)
    except BaseException:
        service.stop()
        raise
    return service


def _is_static_elf(path: Path) -> bool:
    """True if `path` is an ELF64 executable without a program interpreter (PT_INTERP)."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:5] != b"\x7fELF\x02":
            return False
        endian = "<" if header[5] == 1 else ">"
        phoff, = struct.unpack_from(endian + "Q", header, 0x20)  # fmt: skip
        phentsize, phnum = struct.unpack_from(endian + "HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    types = (struct.unpack_from(endian + "I", table, i * phentsize)[0] for i in range(phnum))
    return 3 not in types  # PT_INTERP


def _busybox() -> Path:
    for candidate in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if candidate.exists():
            if not _is_static_elf(candidate):
                raise ServerError(
                    f"{candidate} is dynamically linked, useless in an empty rootfs: "
                    "apt-get install busybox-static"
                )
            return candidate
    raise ServerError("/bin/busybox not found: apt-get install busybox-static")


def _rootfs_tar(busybox: Path) -> bytes:
    """A minimal rootfs: static busybox with every applet linked in /bin."""
    applets = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    files = {
        "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    }
    buf = io.BytesIO()
    now = time.time()

    def entry(name: str, kind: bytes, mode: int, **extra: object) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, now
        for key, value in extra.items():
            setattr(info, key, value)
        return info

    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d, mode in [("bin", 0o755), ("etc", 0o755), ("dev", 0o755), ("proc", 0o555),
                        ("sys", 0o555), ("root", 0o700), ("tmp", 0o1777), ("usr", 0o755),
                        ("usr/bin", 0o755), ("var", 0o755), ("var/tmp", 0o1777)]:  # fmt: skip
            tar.addfile(entry(d, tarfile.DIRTYPE, mode))
        with open(busybox, "rb") as f:
            data = f.read()
        tar.addfile(entry("bin/busybox", tarfile.REGTYPE, 0o755, size=len(data)), io.BytesIO(data))
        for applet in sorted(set(applets) - {"busybox"}):
            tar.addfile(entry(f"bin/{applet}", tarfile.SYMTYPE, 0o777, linkname="busybox"))
        tar.addfile(entry("usr/bin/env", tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"))
        for name, text in files.items():
            raw = text.encode()
            tar.addfile(entry(name, tarfile.REGTYPE, 0o644, size=len(raw)), io.BytesIO(raw))
    return buf.getvalue()


def ensure_sample_image(service: PodmanService, tag: str = SAMPLE_IMAGE) -> str:
    """Return `tag`, first building it (busybox-static rootfs + `podman import`) if absent.

    No registry is reachable on these machines, so this is the base image for tests.
    """
    client = service.client()
    try:
        client.images.get(tag)
        return tag
    except ImageNotFound:
        pass
    finally:
        client.close()
    tar_bytes = _rootfs_tar(_busybox())
    with tempfile.NamedTemporaryFile(suffix=".tar") as tmp:
        tmp.write(tar_bytes)
        tmp.flush()
        service.podman(
            "import", "--quiet",
            "--change", 'CMD=["/bin/sh"]',
            "--change", "LABEL=org.gpumarket.sample=busybox",
            "--message", "gpumarket sample image (busybox-static)",
            tmp.name, tag,
        )  # fmt: skip
    return tag
