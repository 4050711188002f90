"""`gpumarket bench passes`: the per-step arithmetic, and one small run end to end."""

import pytest

from gpumarket.bench_heartbeats import CLK_TCK
from gpumarket.bench_passes import Timings
from tests.gpumarket.bench_runs import bench_figures


def test_a_step_is_summed_over_its_repetitions_and_shared_by_its_jobs() -> None:
    timings = Timings(cpu_s=[0.010, 0.030], wall_s=[0.05, 0.01, 0.03], postgres_ticks=4)
    summary = timings.summary(per=10)
    postgres_ms = 1000 * 4 / CLK_TCK / 2
    assert summary["reps"] == 2
    assert summary["cpu_ms"] == 20.0
    assert summary["postgres_cpu_ms"] == pytest.approx(postgres_ms)
    assert summary["wall_p50_ms"] == 30.0
    assert summary["cpu_ms_per_job"] == pytest.approx((20.0 + postgres_ms) / 10, abs=1e-3)


@pytest.mark.timeout(120)
def test_a_small_run_places_and_ends_every_job() -> None:
    # Fails (exit 1) if a pass placed fewer jobs than were queued, or a batch ended fewer.
    figures = bench_figures(
        "passes", "--providers", "20", "--size", "1", "--size", "5", "--reps", "3", timeout=110
    )
    assert figures["providers"] == 20 and figures["reps"] == 3
    assert figures["gpus"] >= 5
    assert set(figures["sizes"]) == {"1", "5"}
    for size, steps in figures["sizes"].items():
        assert steps["events_batch"]["events"] == 3 * int(size)
        for step in (steps["group_commit"], steps["pass"], steps["events_batch"]):
            assert step["reps"] == 3
            assert step["cpu_ms"] > 0 and step["wall_p50_ms"] > 0
            assert step["postgres_cpu_ms"] >= 0
            assert step["cpu_ms_per_job"] == pytest.approx(
                (step["cpu_ms"] + step["postgres_cpu_ms"]) / int(size), abs=0.01
            )
