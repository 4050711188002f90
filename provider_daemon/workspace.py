"""A job attempt's directory on the host: inputs, outputs, its log, and the output manifest."""

import hashlib
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.messages import OutputFile, TaskAssignment
from provider_daemon.errors import InfrastructureError

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class JobDir:
    root: Path

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def log_file(self) -> Path:
        return self.root / "job.log"

    @property
    def task_file(self) -> Path:
        """The assignment, kept so a restarted daemon can take the running job back."""
        return self.root / "task.json"


def job_dir_of(work_dir: Path, job_id: str, attempt: int) -> JobDir:
    if not _SAFE_ID.fullmatch(job_id):
        raise InfrastructureError(f"job id {job_id!r} is not usable as a directory name")
    return JobDir(work_dir / "jobs" / f"{job_id}-{attempt}")


def create_job_dir(work_dir: Path, job_id: str, attempt: int) -> JobDir:
    job = job_dir_of(work_dir, job_id, attempt)
    # A leftover from an earlier run of this attempt must not leak into this one.
    shutil.rmtree(job.root, ignore_errors=True)
    job.inputs.mkdir(parents=True)
    job.outputs.mkdir()
    # The container may run as any user; it must be able to write its results.
    os.chmod(job.outputs, 0o777)
    job.log_file.touch()
    return job


def save_task(job: JobDir, task: TaskAssignment) -> None:
    job.task_file.write_text(task.model_dump_json())


def saved_task(job: JobDir) -> TaskAssignment | None:
    """The assignment save_task kept, if it is there and readable."""
    try:
        return TaskAssignment.model_validate_json(job.task_file.read_bytes())
    except (OSError, ValueError):
        return None


def job_dirs(work_dir: Path) -> list[JobDir]:
    root = work_dir / "jobs"
    return [JobDir(p) for p in root.iterdir()] if root.is_dir() else []


def remove_job_dir(job: JobDir) -> None:
    shutil.rmtree(job.root, ignore_errors=True)


def safe_input_path(inputs: Path, path: str) -> Path:
    """Where an input named `path` goes under `inputs`; refuses to leave that directory."""
    rel = PurePosixPath(path)
    if not path or rel.is_absolute() or "\\" in path or any(p in ("..", "") for p in rel.parts):
        raise InfrastructureError(f"input path {path!r} is not a safe relative path")
    if rel.parts == (".",) or not rel.parts:
        raise InfrastructureError(f"input path {path!r} names no file")
    return inputs.joinpath(*rel.parts)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    # O_NOFOLLOW: a file swapped for a symlink must not make us read the host's files.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def scan_outputs(outputs: Path) -> tuple[list[OutputFile], list[str]]:
    """Regular files under `outputs` with size and sha256, and the paths skipped.

    The container wrote this tree as it liked, so symlinks (which could point at the
    host's files) and special files are skipped, never followed.
    """
    files: list[OutputFile] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(outputs, followlinks=False):
        base = Path(dirpath)
        for name in list(dirnames):
            if (base / name).is_symlink():
                skipped.append((base / name).relative_to(outputs).as_posix())
                dirnames.remove(name)
        dirnames.sort()
        for name in sorted(filenames):
            path = base / name
            rel = path.relative_to(outputs).as_posix()
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                skipped.append(rel)
                continue
            files.append(OutputFile(path=rel, size=st.st_size, sha256=_sha256(path)))
    return files, skipped
