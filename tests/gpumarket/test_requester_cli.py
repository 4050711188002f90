"""The requester's CLI end to end, as a separate process, against the real platform."""

import hashlib
import json
import os
import stat
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from gpumarket.client import ApiError, Client
from gpumarket.platform import SAMPLE_IMAGE, LocalPlatform
from tests.fixtures.platform import new_user

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class Cli:
    """`gpumarket ...` in its own process, with its own config dir."""

    def __init__(self, platform: LocalPlatform, config_dir: Path, api_key: str | None) -> None:
        self.env = {
            **os.environ,
            "GPUMARKET_CONFIG_DIR": str(config_dir),
            "GPUMARKET_API": platform.gateway_url,
            "COLUMNS": "200",
        }
        self.env.pop("GPUMARKET_API_KEY", None)
        if api_key:
            self.env["GPUMARKET_API_KEY"] = api_key

    def __call__(
        self, *args: str, stdin: str | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gpumarket.cli", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
        )

    def json(self, *args: str) -> object:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def requester_cli(platform: LocalPlatform, requester: Client, tmp_path: Path) -> Cli:
    key = requester.create_api_key("cli tests", roles=["requester"])
    return Cli(platform, tmp_path / "config", key.key)


def write_job(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "job.yaml"
    path.write_text(text)
    return path


# The price cap keeps the jobs on the local daemon's machine (others are priced above it).
JOB_WITH_INPUTS = f"""\
image: {SAMPLE_IMAGE}
command: |
  echo "starting on $NVIDIA_VISIBLE_DEVICES"
  mkdir -p /outputs/deep
  tr a-z A-Z < /inputs/notes.txt > /outputs/deep/NOTES.txt
  cat /inputs/data/a.txt /inputs/data/sub/b.txt > /outputs/ab.txt
  echo "finished $GREETING"
env:
  GREETING: 42
inputs:
  - notes.txt
  - src: data
    dest: data
outputs: ./results
resources:
  gpus: 1
max_duration: 2m
max_price_per_gpu_hour: 1
"""


class TestSubmitFollowDownload:
    def test_a_yaml_job_with_local_inputs_runs_followed_and_its_outputs_come_back(
        self, requester_cli: Cli, tmp_path: Path
    ) -> None:
        work = tmp_path / "work"
        job_file = write_job(work, JOB_WITH_INPUTS)
        notes = b"some notes\n" * 5000
        (work / "notes.txt").write_bytes(notes)
        (work / "data" / "sub").mkdir(parents=True)
        (work / "data" / "a.txt").write_text("a\n")
        (work / "data" / "sub" / "b.txt").write_text("b\n")

        result = requester_cli("submit", str(job_file), "--follow")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("starting on GPU-sim-") and lines[-1] == "finished 42"
        # Status is polled: a quick job may be seen assigned, then already over.
        assert "assigned" in result.stderr or "running" in result.stderr
        assert "succeeded" in result.stderr
        assert "charged" in result.stderr
        # Followed to the end, the outputs are in the file's `outputs` dir.
        assert (work / "results" / "deep" / "NOTES.txt").read_bytes() == notes.upper()
        assert (work / "results" / "ab.txt").read_text() == "a\nb\n"

        [job] = requester_cli.json("jobs")  # type: ignore[misc]
        assert job["status"] == "succeeded" and job["exit_code"] == 0
        assert Decimal(job["cost"]["charged"]) > 0
        shown = requester_cli.json("job", job["id"][:8])
        assert shown == {**job, "queue": None}

        saved = requester_cli.json("download", job["id"][:6], str(tmp_path / "again"))
        files = {f["path"]: f for f in saved["files"]}  # type: ignore[index]
        assert set(files) == {"deep/NOTES.txt", "ab.txt"}
        again = Path(files["deep/NOTES.txt"]["file"])
        assert again == tmp_path / "again" / "deep" / "NOTES.txt"
        assert hashlib.sha256(again.read_bytes()).hexdigest() == files["deep/NOTES.txt"]["sha256"]

        logs = requester_cli("logs", job["id"])
        assert logs.returncode == 0 and logs.stdout.splitlines()[-1] == "finished 42"

    def test_follow_exits_with_the_jobs_exit_code(self, requester_cli: Cli, tmp_path: Path) -> None:
        job_file = write_job(
            tmp_path,
            f"image: {SAMPLE_IMAGE}\ncommand: echo failing; exit 3\n"
            "max_duration: 60\nmax_price_per_gpu_hour: 1\n",
        )
        result = requester_cli("submit", str(job_file), "--follow")
        assert result.returncode == 3, result.stderr
        assert result.stdout == "failing\n"
        assert "failed, exit code 3" in result.stderr

    def test_follow_json_is_one_event_per_line(self, requester_cli: Cli, tmp_path: Path) -> None:
        job_file = write_job(
            tmp_path,
            f"image: {SAMPLE_IMAGE}\ncommand: [echo, hello]\nmax_duration: 60\n"
            "max_price_per_gpu_hour: 1\n",
        )
        result = requester_cli("submit", str(job_file), "--follow", "--json")
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "status" and kinds[-1] == "end"
        assert {"kind": "log", "attempt": 0, "line": "hello"} in events
        assert events[-1]["status"] == "succeeded"

    def test_logs_follow_and_cancel_a_running_job(self, requester_cli: Cli, tmp_path: Path) -> None:
        job_file = write_job(
            tmp_path,
            f"image: {SAMPLE_IMAGE}\ncommand: echo up; sleep 300\nmax_duration: 10m\n"
            "max_price_per_gpu_hour: 1\n",
        )
        submitted = requester_cli.json("submit", str(job_file))
        job_id = submitted["id"]  # type: ignore[index]
        assert submitted["status"] == "queued"  # type: ignore[index]
        follower = subprocess.Popen(
            [sys.executable, "-m", "gpumarket.cli", "logs", job_id, "-f"],
            env=requester_cli.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert follower.stdout is not None
            assert follower.stdout.readline() == "up\n"  # live, while the job runs
            cancelled = requester_cli.json("cancel", job_id[:8])
            assert cancelled["status"] == "cancelled"  # type: ignore[index]
            assert follower.wait(timeout=60) == 0
        finally:
            follower.kill()


class TestPointedErrors:
    def test_unknown_fields_and_bad_values_point_at_their_lines_with_exit_2(
        self, requester_cli: Cli, requester: Client, tmp_path: Path
    ) -> None:
        job_file = write_job(
            tmp_path,
            f"image: {SAMPLE_IMAGE}\n"
            "command: [true]\n"
            "max_duration: 1m\n"
            "colour: blue\n"
            "resources:\n"
            "  gpus: 99\n",
        )
        result = requester_cli("submit", str(job_file))
        assert result.returncode == 2
        assert f"{job_file}:4:1: colour: unknown field" in result.stderr
        assert f"{job_file}:6:9: resources.gpus:" in result.stderr
        assert requester.jobs() == []

    def test_invalid_yaml_is_exit_2_with_its_line(self, requester_cli: Cli, tmp_path: Path) -> None:
        job_file = write_job(tmp_path, "image: x\ncommand: [echo, hi\nmax_duration: 60\n")
        result = requester_cli("submit", str(job_file))
        assert result.returncode == 2
        assert result.stderr.startswith(f"{job_file}:")
        assert result.stdout == ""

    def test_a_missing_input_is_exit_2_and_nothing_is_uploaded(
        self, requester_cli: Cli, tmp_path: Path
    ) -> None:
        job_file = write_job(
            tmp_path, "image: x\ncommand: [true]\nmax_duration: 60\ninputs:\n  - nowhere.bin\n"
        )
        result = requester_cli("submit", str(job_file))
        assert result.returncode == 2
        assert f"{job_file}:5:5: inputs.0:" in result.stderr

    def test_not_enough_credits_is_exit_1_saying_what_is_missing(
        self, platform: LocalPlatform, tmp_path: Path
    ) -> None:
        broke = new_user(platform, credits=Decimal(0))
        cli = Cli(platform, tmp_path / "config", broke.create_api_key("cli").key)
        job_file = write_job(
            tmp_path, f"image: {SAMPLE_IMAGE}\ncommand: [true]\nmax_duration: 1h\n"
        )
        result = cli("submit", str(job_file))
        assert result.returncode == 1
        assert "more credits are needed" in result.stderr
        assert broke.jobs() == []

    def test_without_a_login_every_command_says_so(
        self, platform: LocalPlatform, tmp_path: Path
    ) -> None:
        cli = Cli(platform, tmp_path / "nobody", None)
        result = cli("jobs")
        assert result.returncode == 1
        assert "gpumarket login" in result.stderr


class TestLogin:
    def test_login_keeps_a_private_key_and_logout_revokes_it(
        self, platform: LocalPlatform, tmp_path: Path
    ) -> None:
        user = new_user(platform)
        me = user.me()
        cli = Cli(platform, tmp_path / "config", None)
        login = cli(
            "login", "--email", me.email, "--password-stdin", stdin="correct-horse-battery\n"
        )
        assert login.returncode == 0, login.stderr
        saved = tmp_path / "config" / "credentials.json"
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        key = json.loads(saved.read_text())["api_key"]
        assert cli.json("whoami")["email"] == me.email  # type: ignore[index]
        assert cli.json("balance")["available"] == "1000.000000"  # type: ignore[index]
        usage = cli.json("storage")
        assert usage["used_bytes"] >= 0 and usage["quota_bytes"] > 0  # type: ignore[index]
        shown = cli("storage")
        assert shown.returncode == 0 and "QUOTA" in shown.stdout, shown.stderr

        assert cli.json("logout") == {"logged_out": True, "api": platform.gateway_url}
        assert not saved.exists()
        with pytest.raises(ApiError) as revoked:
            Client(platform.gateway_url, token=key).me()
        assert revoked.value.status_code == 401

    def test_a_wrong_password_is_refused(self, platform: LocalPlatform, tmp_path: Path) -> None:
        me = new_user(platform).me()
        cli = Cli(platform, tmp_path / "config", None)
        login = cli("login", "--email", me.email, "--password-stdin", stdin="not-the-password\n")
        assert login.returncode == 1
        assert not (tmp_path / "config" / "credentials.json").exists()


class TestMarket:
    def test_offers_filter_and_bad_filters_name_the_option(self, requester_cli: Cli) -> None:
        page = requester_cli.json("offers", "--model", "RTX 4090")
        assert page["offers"] and {o["model"] for o in page["offers"]} == {"RTX 4090"}  # type: ignore[index]
        assert requester_cli.json("offers", "--model", "no-such-gpu")["total"] == 0  # type: ignore[index]
        bad = requester_cli("offers", "--min-vram", "-1")
        assert bad.returncode == 2 and "--min-vram" in bad.stderr
        table = requester_cli("offers")
        assert table.returncode == 0 and "RTX 4090" in table.stdout


def test_the_examples_cpu_job_runs_on_the_local_platform(
    requester_cli: Cli, tmp_path: Path
) -> None:
    """examples/cpu-hello as a requester would run it (copied: it downloads beside itself)."""
    work = tmp_path / "cpu-hello"
    work.mkdir()
    for source in (EXAMPLES / "cpu-hello").iterdir():
        if source.is_file():
            (work / source.name).write_bytes(source.read_bytes())
    result = requester_cli("submit", "job.yaml", "--follow", cwd=work)
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "outputs" / "result.json").read_text())["greeting"] == "world"
