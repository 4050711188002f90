"""`gpumarket bench jobs`: the platform's own latency and throughput, end to end."""

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from gpumarket.client import Client
from gpumarket.platform import SAMPLE_IMAGE

TERMINAL = {"succeeded", "failed", "cancelled", "timed_out"}


def _seconds(start: str, end: str | None) -> float | None:
    if end is None:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50": pick(0.5),
        "p95": pick(0.95),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def run_jobs_bench(gateway_url: str, account: dict[str, str], count: int, console: Console) -> dict:
    """Submits `count` jobs running `true` at once, waits for all, prints the figures."""
    client = Client(gateway_url)
    client.register_or_login(account["email"], account["password"], "requester")
    spec = {
        "image": SAMPLE_IMAGE,
        "command": ["true"],
        "resources": {"gpus": 1},
        "max_duration_s": 300,
    }

    def submit(_: int) -> tuple[str, float]:
        started = time.perf_counter()
        job = client.submit(spec)
        return job.id, time.perf_counter() - started

    wall_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        submitted = list(pool.map(submit, range(count)))
    submit_s = time.perf_counter() - wall_start
    pending = {job_id for job_id, _ in submitted}
    finished: dict[str, dict] = {}
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("jobs finished", total=count)
        while pending:
            for job in client.request("GET", "/v1/jobs", params={"limit": 1000}):
                if job["id"] in pending and job["status"] in TERMINAL:
                    pending.discard(job["id"])
                    finished[job["id"]] = job
                    progress.advance(bar)
            time.sleep(0.2)
    wall_s = time.perf_counter() - wall_start

    jobs = list(finished.values())
    figures = {
        "jobs": count,
        "succeeded": sum(j["status"] == "succeeded" for j in jobs),
        "submit_http_s": _percentiles([s for _, s in submitted]),
        "queued_to_assigned_s": _percentiles(
            [_seconds(j["created_at"], j["assigned_at"]) or 0.0 for j in jobs]
        ),
        "assigned_to_running_s": _percentiles(
            [_seconds(j["assigned_at"], j["started_at"]) or 0.0 for j in jobs]
        ),
        "submit_to_finished_s": _percentiles(
            [_seconds(j["created_at"], j["finished_at"]) or 0.0 for j in jobs]
        ),
        "submissions_per_s": round(count / submit_s, 1),
        "jobs_finished_per_s": round(count / wall_s, 2),
        "wall_s": round(wall_s, 2),
    }
    table = Table(title=f"{count} jobs (`true`) on the local platform")
    table.add_column("figure")
    for column in ("p50", "p95", "max", "mean"):
        table.add_column(column, justify="right")
    for name in (
        "submit_http_s",
        "queued_to_assigned_s",
        "assigned_to_running_s",
        "submit_to_finished_s",
    ):
        row = figures[name]
        table.add_row(name, *(f"{row[k]:.3f}" for k in ("p50", "p95", "max", "mean")))
    console.print(table)
    console.print(
        f"succeeded {figures['succeeded']}/{count}; "
        f"{figures['submissions_per_s']} submissions/s; "
        f"{figures['jobs_finished_per_s']} jobs finished/s; wall {figures['wall_s']} s"
    )
    print(json.dumps(figures))
    return figures
