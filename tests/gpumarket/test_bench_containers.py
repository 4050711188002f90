"""`gpumarket bench containers`: small runs end to end, on a fresh local platform each."""

import json
import subprocess
import sys

import pytest

from gpumarket.bench_containers import RESULT_KEYS

JOBS = 4


def run_bench(*args: str) -> tuple[int, dict, str]:
    result = subprocess.run(
        [sys.executable, "-m", "gpumarket.cli", "bench", "containers", "--jobs", str(JOBS),
         # Fails (exit 1) well before pytest's timeout if jobs stall.
         "--timeout", "90", *args],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    output = result.stdout[-5000:] + result.stderr[-5000:]
    lines = result.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1])
    except (IndexError, ValueError):
        pytest.fail(f"the last line is not JSON:\n{output}")
    return result.returncode, figures, output


@pytest.mark.timeout(300)
def test_every_job_runs_on_both_sides() -> None:
    code, figures, output = run_bench()
    assert code == 0, output
    assert set(RESULT_KEYS) <= figures.keys()
    # The local daemon's 2 simulated GPUs: 2 jobs at once, and 2 containers on the engine.
    assert figures["jobs"] == JOBS and figures["concurrency"] == 2
    assert figures["succeeded"] == JOBS and figures["failed"] == 0
    assert figures["failures"] == [] and not figures["timed_out"]
    assert figures["engine_failed"] == 0
    platform, engine = figures["platform_jobs_per_s"], figures["engine_jobs_per_s"]
    assert platform > 0 and engine > 0
    assert figures["ratio"] == pytest.approx(platform / engine, abs=0.002)
    # The platform's rate is its jobs over first submit -> last finished.
    assert platform == pytest.approx(JOBS / figures["platform_span_s"], rel=0.01)
    assert engine == pytest.approx(2 * JOBS / figures["engine_wall_s"], rel=0.01)
    assert figures["scheduler_passes"] >= 1

    phases = figures["platform_phases_p50_s"]
    # A GPU goes to the next job when a container exits, before that job has finished.
    overlapping = {"finished_to_next_assigned"}
    assert all(v is not None for v in phases.values()), phases
    assert all(v >= 0 for k, v in phases.items() if k not in overlapping), phases
    assert phases["started_to_finished"] > 0
    assert phases["assigned_to_finished"] >= phases["assigned_to_started"]
    # The daemon's log still marks every step it is timed by.
    assert all(v is not None and v >= 0 for v in figures["daemon_phases_p50_s"].values())
    # An engine run's calls happen within its total (the job dir's work is the rest).
    means = figures["engine_phases_mean_s"]
    calls = sum(means[name] for name in ("create", "start", "wait", "logs", "remove"))
    assert 0 < calls <= means["total"] + 0.001
    for part in ("platform", "engine_before", "engine_after"):
        assert figures["cpu_s"][part]["podman"] > 0
        assert 0 < figures["cpu_s"][part]["machine"]
    assert figures["cpu_s"]["platform"]["provider_daemon"] > 0


@pytest.mark.timeout(300)
def test_failed_jobs_are_reported_and_not_counted() -> None:
    # Submitted as one job array, the other way in.
    code, figures, output = run_bench("--command", "false", "--array")
    assert code == 1, output
    assert figures["submit"] == "array"
    assert figures["succeeded"] == 0 and figures["failed"] == JOBS
    assert len(figures["failures"]) == JOBS
    assert all(f["status"] == "failed" and f["exit_code"] == 1 for f in figures["failures"])
    assert figures["platform_jobs_per_s"] == 0
    # The engine's containers exit 1 too: nothing counts, so there is no ratio.
    assert figures["engine_failed"] == 2 * JOBS
    assert figures["engine_errors"][0] == "exit code 1"
    assert figures["engine_jobs_per_s"] == 0 and figures["ratio"] is None
