"""The Grafana dashboards and the Prometheus alerting rules, checked without any server
(tests/promql_sources.py lists the expressions; an integration test runs them)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests import promql_sources as src

EXPECTED_DASHBOARDS = {"fleet.json", "jobs.json", "marketplace.json", "service-health.json"}
PANEL_TYPES = {"timeseries", "stat", "table", "bargauge"}
SEVERITIES = {"critical", "warning", "info"}
# Gauges every replica of a service exports alike: aggregate with max, never sum.
REPLICA_IDENTICAL_GAUGES = (
    "gpumarket_providers",
    "gpumarket_gpus",
    "gpumarket_gpu_utilization_percent",
    "gpumarket_gpu_memory_used_bytes",
    "gpumarket_gpu_temperature_celsius",
    "gpumarket_gpu_power_watts",
    "gpumarket_gpu_healthy",
    "gpumarket_gpu_busy",
    "gpumarket_gpu_price_per_hour",
    "gpumarket_jobs",
    "gpumarket_queued_gpus",
    "scheduler_queue_depth",
)
MATCHER_VALUE = re.compile(r'[A-Za-z_]\w*\s*=~\s*"((?:[^"\\]|\\.)*)"')
PROMTOOL = shutil.which("promtool")


def panels(dashboard: dict) -> list[dict]:
    return list(src.iter_panels(dashboard.get("panels", [])))


def query_panels(dashboard: dict) -> list[dict]:
    return [p for p in panels(dashboard) if p.get("type") != "row"]


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    return src.load_dashboards()


def test_the_four_dashboards_are_valid_json() -> None:
    assert {p.name for p in src.dashboard_files()} == EXPECTED_DASHBOARDS
    for path in src.dashboard_files():
        json.loads(path.read_text())  # raises on invalid JSON


def test_dashboard_settings(dashboards: dict[str, dict]) -> None:
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids), uids
    for name, d in dashboards.items():
        assert re.fullmatch(r"gpumarket-[a-z-]+", d["uid"]), name
        assert len(d["uid"]) <= 40, name
        assert d["title"].startswith("GPU marketplace: "), name
        assert "gpumarket" in d["tags"], name
        assert d["schemaVersion"] == 39, name
        assert d["refresh"] == "30s", name
        assert d["time"] == {"from": "now-6h", "to": "now"}, name
        assert "id" not in d or d["id"] is None, f"{name}: provisioned dashboards carry no id"


def test_panel_ids_are_unique_and_panels_fit_the_grid(dashboards: dict[str, dict]) -> None:
    for name, d in dashboards.items():
        ids = [p["id"] for p in panels(d)]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        for p in panels(d):
            pos = p["gridPos"]
            assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, f"{name}: {p['title']}"
            assert pos["h"] > 0 and pos["w"] > 0, f"{name}: {p['title']}"


def test_every_panel_queries_prometheus(dashboards: dict[str, dict]) -> None:
    for name, d in dashboards.items():
        assert query_panels(d), name
        for p in query_panels(d):
            where = f"{name}: {p.get('title')}"
            assert p["type"] in PANEL_TYPES, where
            assert p["title"], where
            assert p["datasource"] == {"type": "prometheus", "uid": "prometheus"}, where
            assert p["targets"], where
            ref_ids = [t["refId"] for t in p["targets"]]
            assert len(set(ref_ids)) == len(ref_ids), where
            for t in p["targets"]:
                assert t["datasource"] == {"type": "prometheus", "uid": "prometheus"}, where
                assert isinstance(t.get("expr"), str) and t["expr"].strip(), where
                assert isinstance(t.get("legendFormat"), str), where
                assert t["refId"], where
        for v in d.get("templating", {}).get("list", []):
            assert v["datasource"]["uid"] == "prometheus", f"{name}: variable {v['name']}"


def test_template_variables_appear_only_in_regex_matchers(dashboards: dict[str, dict]) -> None:
    for name, d in dashboards.items():
        defined = {v["name"] for v in d.get("templating", {}).get("list", [])}
        for v in d.get("templating", {}).get("list", []):
            if v.get("includeAll"):
                assert v.get("allValue") == ".*", f"{name}: variable {v['name']}"
        for p in query_panels(d):
            for t in p["targets"]:
                expr = t["expr"]
                for used in src.variable_names(expr):
                    if used in src.BUILTIN_VARIABLES:
                        continue
                    assert used in defined, f"{name}: {p['title']}: ${used} is not defined"
                # Outside `=~"..."` matchers only Grafana's built-in intervals may appear.
                outside = MATCHER_VALUE.sub("", expr)
                leftover = set(src.variable_names(outside)) - set(src.BUILTIN_VARIABLES)
                assert not leftover, f"{name}: {p['title']}: {leftover} outside a =~ matcher"


def test_promql_expressions_have_their_variables_substituted() -> None:
    exprs = src.promql_expressions()
    assert len(exprs) == sum(len(p["targets"]) for p in _all_query_panels())
    for where, expr in exprs:
        assert not src.VARIABLE.search(expr), where
        assert expr.count("(") == expr.count(")"), where
        assert expr.count("{") == expr.count("}"), where
    assert src.substitute_variables(
        'rate(x{model=~"$model", b=~"${b}"}[$__rate_interval]) + increase(y[$__range])'
        ' + z[$__interval] + label_replace(w, "d", "$1", "s", "(.*)")'
    ) == (
        'rate(x{model=~".*", b=~".*"}[1m]) + increase(y[1h])'
        ' + z[15s] + label_replace(w, "d", "$1", "s", "(.*)")'
    )


def _all_query_panels() -> list[dict]:
    return [p for d in src.load_dashboards().values() for p in query_panels(d)]


def test_replica_identical_gauges_are_taken_with_max_and_counters_with_rate() -> None:
    exprs = src.promql_expressions() + [(r["alert"], str(r["expr"])) for r in src.alert_rules()]
    for where, expr in exprs:
        for gauge in REPLICA_IDENTICAL_GAUGES:
            for m in re.finditer(rf"\b{gauge}\b(?!_)", expr):
                before = expr[: m.start()].rstrip()
                assert re.search(r"(\bmax(\s+by\s*\([^)]*\))?\s*|\bmax_over_time)\($", before), (
                    f"{where}: {gauge} must be aggregated with max first (replicas export it alike)"
                )
        for m in re.finditer(r"\b\w+(_total|_bucket|_count|_sum)\b", expr):
            before = expr[: m.start()].rstrip()
            assert re.search(r"\b(rate|increase)\($", before), f"{where}: {m.group()} not in rate()"


def test_alert_rules_are_complete() -> None:
    document = yaml.safe_load(src.ALERTS_FILE.read_text())
    assert document["groups"]
    names = []
    for group in document["groups"]:
        assert group["name"] and group["rules"], group.get("name")
        for rule in group["rules"]:
            assert rule.get("alert"), rule
            names.append(rule["alert"])
            assert str(rule.get("expr", "")).strip(), rule["alert"]
            assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), rule["alert"]
            assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
            assert rule["annotations"]["summary"].strip(), rule["alert"]
            assert rule["annotations"]["description"].strip(), rule["alert"]
            assert "$__" not in str(rule["expr"]), f"{rule['alert']}: Grafana variable in a rule"
    assert len(set(names)) == len(names), names
    for required in ("ProvidersLostInBulk", "QueueWaitP95High", "HighErrorRate", "ServiceDown"):
        assert required in names


def test_alert_expressions_end_in_a_comparison_and_have_a_bool_form() -> None:
    forms = dict(src.alert_expressions())
    assert set(forms) == {r["alert"] for r in src.alert_rules()}
    assert forms["ServiceDown"] == "up == bool 0"
    for name, expr in forms.items():
        assert re.search(r"(==|!=|>=|<=|>|<) bool [-+.\deE]+$", expr), name


def test_bool_form_refuses_what_is_not_a_top_level_comparison() -> None:
    assert src.bool_form("sum(x) > 0.05") == "sum(x) > bool 0.05"
    assert src.bool_form("(a or b) >= 1e-3") == "(a or b) >= bool 1e-3"
    assert src.bool_form('a * (b{x="1"} > bool 0) <= 5') == 'a * (b{x="1"} > bool 0) <= bool 5'
    for bad in ("sum(x)", "a or b > 5", "a > bool 5", "a unless b == 0", "(a > 5)"):
        with pytest.raises(ValueError):
            src.bool_form(bad)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(src.ALERTS_FILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_parses_every_expression(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each dashboard query (variables substituted) and each alert's bool form, as recording
    rules, so that promtool's parser checks them."""
    exprs = src.promql_expressions() + src.alert_expressions()
    rules = [{"record": f"check:expr_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "check", "rules": rules}]}))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        # Name the failing expressions.
        output = result.stdout + result.stderr
        bad = [
            f"{where}: {e}" for i, (where, e) in enumerate(exprs) if f'"check:expr_{i}"' in output
        ]
        pytest.fail(output + "\n".join(bad))
