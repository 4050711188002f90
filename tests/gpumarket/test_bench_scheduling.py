"""`gpumarket bench scheduling`: small runs end to end, through each front door."""

import os

import pytest

from gpumarket.bench_scheduling import RESULT_KEYS, Pacer, percentile
from tests.gpumarket.bench_runs import bench_figures

JOBS = 200


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(n) for n in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0


async def test_the_pacer_sends_at_its_rate_whatever_the_answers_speed() -> None:
    now = [100.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 6))
        now[0] += seconds

    pacer = Pacer(rate=4, clock=lambda: now[0], sleep=sleep)
    await pacer.turn()  # the first at once
    await pacer.turn()  # 0.25 s after it
    now[0] += 1.0  # a slow answer: it is 101.25, and the next three are late
    await pacer.turn()  # due at 100.5: goes at once
    await pacer.turn()  # due at 100.75
    await pacer.turn()  # due at 101.0
    await pacer.turn()  # due at 101.25
    await pacer.turn()  # due at 101.5
    assert waits == [0.25, 0.25]
    closed = Pacer(rate=None, clock=lambda: now[0], sleep=sleep)
    await closed.turn()
    await closed.turn()
    assert waits == [0.25, 0.25]


def run_bench(*args: str) -> dict:
    return bench_figures(
        "scheduling", "--providers", "20", "--jobs", str(JOBS), "--schedulers", "2",
        # Fails loudly (exit 1) well before pytest's timeout if placing stalls.
        "--timeout", "45", "--decision-machines", "1000", *args, timeout=110,
    )  # fmt: skip


def check_figures(figures: dict) -> None:
    assert set(RESULT_KEYS) <= figures.keys()
    assert figures["providers"] == 20 and figures["jobs"] == JOBS
    assert figures["schedulers"] == 2
    # No job lost: every one was assigned, and every daemon's `finished` came back.
    assert figures["assigned"] == JOBS
    assert figures["succeeded"] == JOBS
    assert figures["tasks_answered"] >= JOBS
    assert figures["daemon_errors"] == 0
    # More jobs than GPUs: placing them all needed GPUs freed by `finished` events.
    assert figures["gpus"] < JOBS
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert figures["jobs_per_s"] > 0 and figures["jetstream_raw_per_s"] > 0
    assert figures["ratio"] == pytest.approx(
        figures["jobs_per_s"] / figures["jetstream_raw_per_s"], rel=0.01, abs=1e-4
    )
    # jobs/s counts from the first submit to the last assignment; the slowest job waited
    # at most that long.
    assert figures["max_ms"] <= figures["placement_s"] * 1000 + 10
    assert figures["jobs_per_s"] == pytest.approx(JOBS / figures["placement_s"], rel=0.02)
    assert set(figures["scheduler_cpu_s"]) == {"scheduler", "scheduler-2"}
    assert figures["cpu_s"]["schedulers"] > 0 and figures["cpu_s"]["postgres"] > 0
    assert figures["cpu_s"]["nats"] > 0 and figures["cpu_s"]["daemons"] > 0
    # Each job: its task and its daemon's three events; wake-ups are shared by a batch.
    per_job = figures["messages_per_job"]
    assert per_job["tasks"] >= 1 and per_job["events"] >= 3 and 0 < per_job["jobs"] <= 1
    raw_cpu = figures["jetstream_raw_cpu_us"]
    assert raw_cpu["server"] > 0 and raw_cpu["client"] > 0
    # The transport's ceiling, from the same figures: the run can't have gone past it.
    bound = len(os.sched_getaffinity(0)) * 1e6 / (sum(per_job.values()) * sum(raw_cpu.values()))
    assert figures["transport_bound_jobs_per_s"] == pytest.approx(bound, rel=0.01)
    assert figures["jobs_per_s"] < figures["transport_bound_jobs_per_s"]
    decision = figures["decision_ms"]["1000"]
    assert 0 < decision["p50_ms"] <= decision["p99_ms"] <= decision["max_ms"]


@pytest.mark.timeout(120)
def test_via_jetstream() -> None:
    figures = run_bench("--via", "jetstream")
    check_figures(figures)
    assert figures["via"] == "jetstream"
    assert figures["cpu_s"]["gateway"] < figures["cpu_s"]["schedulers"]


@pytest.mark.timeout(120)
def test_via_gateway() -> None:
    figures = run_bench("--via", "gateway", "--rate", "400")
    check_figures(figures)
    assert figures["via"] == "gateway" and figures["batch"] == 1 and figures["rate"] == 400
    assert figures["submit_requests"] == JOBS
    assert figures["cpu_s"]["gateway"] > 0 and figures["cpu_s"]["auth"] > 0


@pytest.mark.timeout(120)
def test_via_gateway_in_batches() -> None:
    figures = run_bench("--via", "gateway", "--batch", "50", "--concurrency", "4")
    check_figures(figures)
    assert figures["via"] == "gateway" and figures["batch"] == 50
    assert figures["submit_requests"] == JOBS // 50
    assert figures["cpu_s"]["gateway"] > 0
