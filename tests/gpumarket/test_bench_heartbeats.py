"""`gpumarket bench heartbeats`: the quantile arithmetic, and one small run end to end."""

import math

import pytest

from gpumarket.bench_heartbeats import (
    RESULT_KEYS,
    bucket_deltas,
    histogram_quantile,
    parse_metrics,
)
from tests.gpumarket.bench_runs import bench_figures

INF = math.inf


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 10 observations <= 0.1, 30 in (0.1, 0.5], 60 in (0.5, 1.0], none above.
    buckets = [(0.1, 10.0), (0.5, 40.0), (1.0, 100.0), (INF, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.5 + 0.5 * 10 / 60)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * 59 / 60)
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.05)  # from 0 in the first
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1 + 0.4 * 15 / 30)


def test_quantile_edges() -> None:
    # As Prometheus: a rank in the +Inf bucket gives the highest finite bound.
    assert histogram_quantile(0.99, [(1.0, 50.0), (INF, 100.0)]) == 1.0
    assert histogram_quantile(0.5, [(1.0, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(1.0, 4.0)]) is None  # no +Inf bucket: not a histogram
    # Unsorted input is fine.
    assert histogram_quantile(0.5, [(INF, 4.0), (2.0, 4.0), (1.0, 0.0)]) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        histogram_quantile(1.5, [(INF, 1.0)])


METRICS = """\
# TYPE registry_heartbeats_total counter
registry_heartbeats_total{{result="ok"}} {ok}
registry_heartbeats_total{{result="invalid"}} 7.0
# TYPE registry_heartbeat_ingest_lag_seconds histogram
registry_heartbeat_ingest_lag_seconds_bucket{{le="0.1"}} {b1}
registry_heartbeat_ingest_lag_seconds_bucket{{le="1.0"}} {b2}
registry_heartbeat_ingest_lag_seconds_bucket{{le="+Inf"}} {b3}
registry_heartbeat_ingest_lag_seconds_count {b3}
registry_heartbeat_ingest_lag_seconds_sum 1.0
"""


def test_window_between_two_scrapes() -> None:
    before = parse_metrics(METRICS.format(ok=100.0, b1=50.0, b2=90.0, b3=100.0))
    after = parse_metrics(METRICS.format(ok=300.0, b1=50.0, b2=290.0, b3=300.0))
    assert after.heartbeats_ok - before.heartbeats_ok == 200.0
    window = bucket_deltas(before.lag_buckets, after.lag_buckets)
    assert window == [(0.1, 0.0), (1.0, 200.0), (INF, 200.0)]
    assert histogram_quantile(0.5, window) == pytest.approx(0.55)


def test_bench_heartbeats_end_to_end() -> None:
    figures = bench_figures(
        "heartbeats", "--providers", "50", "--interval", "1", "--duration", "5",
        "--processes", "2", timeout=240,
    )  # fmt: skip
    assert set(RESULT_KEYS) <= figures.keys()
    assert figures["providers"] == 50 and figures["processes"] == 2
    assert figures["heartbeats_per_s"] > 0
    assert figures["heartbeats_sent_per_s"] > 0
    assert isinstance(figures["ingest_lag_p99_s"], float) and figures["ingest_lag_p99_s"] > 0
    assert figures["ingest_lag_p50_s"] <= figures["ingest_lag_p99_s"]
