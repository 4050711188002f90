"""Runs a `gpumarket bench` command the way a user does, for the bench tests."""

import json
import subprocess
import sys


def bench_figures(command: str, *args: str, timeout: float) -> dict:
    """`gpumarket bench COMMAND ARGS...` in a subprocess: the JSON of its last line."""
    result = subprocess.run(
        [sys.executable, "-m", "gpumarket.cli", "bench", command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
