"""What the machine's owner lets strangers' jobs do here, and each job's resource limits.

The owner sets the policy in the daemon's config file; a task that breaks it is refused
before anything is pulled or run, so the platform places it on another machine.
"""

from dataclasses import dataclass
from fnmatch import fnmatchcase

from docker.utils import parse_repository_tag
from pydantic import BaseModel, ConfigDict, Field

from common.messages import TaskAssignment

# Who a job runs as when the image names root, or a user by name (whose uid we can't
# know without trusting the image's /etc/passwd): the conventional "nobody".
NOBODY = "65534:65534"
DEFAULT_REGISTRY = "docker.io"


class ContainerPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Shell-style patterns over the full image reference ("docker.io/pytorch/*",
    # "nvcr.io/nvidia/*"); empty: any image. The deny list wins.
    allow_images: list[str] = Field(default_factory=list)
    deny_images: list[str] = Field(default_factory=list)
    # Images larger than this (unpacked, as the engine reports them) are refused.
    max_image_gb: float | None = Field(default=None, gt=0)
    # Jobs that ask for network access (egress) get it only where this is on.
    network: bool = False
    # Jobs run as the image's numeric non-root user, or nobody, unless this is on.
    allow_root: bool = False
    # An OCI runtime the engine knows, e.g. "runsc" (gVisor) for a stronger sandbox.
    runtime: str | None = Field(default=None, min_length=1)
    # The job's writable /tmp (the root file system is read-only); counts as its memory.
    tmp_size_mb: int = Field(default=1024, ge=16)
    pids_limit: int = Field(default=4096, ge=64)


def full_reference(image: str) -> str:
    """ "busybox" -> "docker.io/library/busybox:latest": what the patterns are matched on."""
    repository, tag = parse_repository_tag(image)
    first, _, rest = repository.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        # No registry host in the name: Docker Hub, "library/" for official images.
        repository = f"{DEFAULT_REGISTRY}/{repository if rest else 'library/' + repository}"
    if tag is None:
        return f"{repository}:latest"
    separator = "@" if tag.startswith("sha256:") else ":"
    return f"{repository}{separator}{tag}"


def image_refusal(policy: ContainerPolicy, image: str) -> str | None:
    """Why this machine won't run `image`, or None."""
    reference = full_reference(image)
    if any(fnmatchcase(reference, pattern) for pattern in policy.deny_images):
        return f"image {reference} is denied by this machine's policy"
    if policy.allow_images and not any(
        fnmatchcase(reference, pattern) for pattern in policy.allow_images
    ):
        return f"image {reference} is not in this machine's list of allowed images"
    return None


def image_size_refusal(policy: ContainerPolicy, image: str, size_bytes: int) -> str | None:
    if policy.max_image_gb is not None and size_bytes > policy.max_image_gb * 1024**3:
        return (
            f"image {image} is {size_bytes / 1024**3:.1f} GiB; this machine takes images "
            f"up to {policy.max_image_gb:g} GiB"
        )
    return None


def task_refusal(policy: ContainerPolicy, task: TaskAssignment) -> str | None:
    """Why this machine won't take the task at all, or None."""
    if task.egress and not policy.network:
        return "the job needs network access and this machine allows none"
    return image_refusal(policy, task.image)


def run_as(policy: ContainerPolicy, image_user: str) -> str | None:
    """The user a job's container runs as; None keeps the image's own (root allowed)."""
    if policy.allow_root:
        return None
    uid, _, gid = image_user.partition(":")
    if uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit()):
        return image_user
    return NOBODY


@dataclass(frozen=True)
class Limits:
    """A job's share of the machine, enforced by the engine."""

    cpus: float | None
    memory_mb: int | None
    pids: int


def limits_for(
    gpu_count: int, machine_gpus: int, cpu_count: int | None, memory_mb: int | None, pids: int
) -> Limits:
    """A job with k of the machine's n GPUs gets k/n of its CPUs and memory: the same share
    placement counted when it matched the job's cpus and memory_gb (scheduler.fleet_index)."""
    share = max(gpu_count, 1) / max(machine_gpus, 1)
    return Limits(
        cpus=round(cpu_count * share, 3) if cpu_count else None,
        memory_mb=int(memory_mb * share) if memory_mb else None,
        pids=pids,
    )
