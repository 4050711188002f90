"""The daemon's saved state: who it is (after join) and how it runs."""

import os
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from provider_daemon.errors import ConfigError
from provider_daemon.policy import ContainerPolicy

CONFIG_ENV = "GPUMARKET_PROVIDER_CONFIG"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# The machine check's image: tiny, and on real GPUs the NVIDIA toolkit mounts nvidia-smi
# into whatever image it is.
DEFAULT_CHECK_IMAGE = "docker.io/library/busybox:1.36"


def default_config_path() -> Path:
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "gpumarket" / "provider.json"


def default_work_dir() -> Path:
    return Path.home() / ".local" / "share" / "gpumarket" / "provider"


def default_docker_host() -> str:
    return os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


def new_machine_id() -> str:
    return str(uuid.uuid4())


class ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_url: str
    machine_id: str
    name: str
    region: str | None = None
    simulate: str | None = None
    prices: dict[str, float] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    check_image: str = DEFAULT_CHECK_IMAGE
    work_dir: Path = Field(default_factory=default_work_dir)
    docker_host: str = Field(default_factory=default_docker_host)
    metrics_port: int | None = None
    # What jobs may do here (images, network, root, runtime); see provider_daemon.policy.
    policy: ContainerPolicy = Field(default_factory=ContainerPolicy)
    # The machine's size as told to the platform at join: each job gets its GPUs' share.
    cpu_count: int | None = None
    memory_mb: int | None = None
    # From the join response.
    provider_id: str
    credential: str
    nats_url: str
    heartbeat_interval_s: float = 5.0


def save_config(config: ProviderConfig, path: Path) -> None:
    """Writes the config readable by its owner only: it holds the provider's credential."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config.model_dump_json(indent=2))
        f.write("\n")
    # O_CREAT's mode does not apply to a file that already existed.
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_config(path: Path) -> ProviderConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"no provider config at {path}; run `provider-daemon join --token T --api URL` first"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read provider config {path}: {exc.strerror}") from None
    try:
        return ProviderConfig.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        raise ConfigError(f"invalid provider config {path}: {where}: {first['msg']}") from None


def read_previous(path: Path) -> ProviderConfig | None:
    """The config of an earlier join, if a readable one is there."""
    try:
        return load_config(path)
    except ConfigError:
        return None


def read_machine_id(path: Path) -> str | None:
    """The machine id of an earlier join, so re-joining keeps this machine's identity."""
    previous = read_previous(path)
    return previous.machine_id if previous else None


def pid_path(config_path: Path) -> Path:
    """Where a running daemon notes its pid, so `leave` can stop it."""
    return config_path.with_name(config_path.name + ".pid")
