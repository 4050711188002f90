"""Every PromQL expression of the Grafana dashboards and the alert rules, evaluated by a
real Prometheus (Debian's `prometheus`) scraping the stack `gpumarket up` runs, after a few
jobs: each must parse and return data. Then a service is stopped and its alert fires."""

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from gpumarket.client import Client
from gpumarket.localstack.podman import SAMPLE_IMAGE
from gpumarket.localstack.process import free_port, stop_process, wait_until
from tests.gpumarket.test_up import processes_using, start_up, wait_for_text
from tests.promql_sources import ALERTS_FILE, alert_expressions, promql_expressions

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed"
)


def prometheus_config(targets: Path, prometheus_port: int) -> dict:
    # The compose configuration finds the services in Consul; here the same jobs come from
    # the file `gpumarket up` writes. Everything else as in deploy/prometheus/prometheus.yml.
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS_FILE)],
        "scrape_configs": [
            {"job_name": "gpumarket", "file_sd_configs": [{"files": [str(targets)]}]},
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"127.0.0.1:{prometheus_port}"]}],
            },
        ],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """`gpumarket up` with its sample job, as a user runs it."""
    data_dir = tmp_path_factory.mktemp("promql") / "data"
    port = free_port()
    proc, out = start_up(data_dir, port)
    try:
        wait_for_text(proc, out, "sample job result")
        yield data_dir, port
    finally:
        proc.terminate()
        proc.wait(timeout=90)
        assert processes_using(data_dir) == []


@pytest.fixture(scope="module")
def prometheus(stack: tuple[Path, int]) -> Iterator[httpx.Client]:
    data_dir, _ = stack
    port = free_port()
    config = data_dir.parent / "prometheus.yml"
    config.write_text(json.dumps(prometheus_config(data_dir / "prometheus-targets.json", port)))
    log = (data_dir.parent / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={data_dir.parent / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        # Its own process group: stop_process signals the group, and without one it found
        # none and left prometheus running after the tests.
        start_new_session=True,
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=10)
    try:
        wait_until(lambda: api.get("/status/buildinfo").status_code == 200, 60, "prometheus", proc)
        yield api
    finally:
        api.close()
        stop_process(proc)
        log.close()


def run_a_few_jobs(gateway_url: str, data_dir: Path) -> None:
    accounts = json.loads((data_dir / "dev-accounts.json").read_text())
    with Client(gateway_url) as client:
        client.login(accounts["requester"]["email"], accounts["requester"]["password"])
        ok = client.submit({"image": SAMPLE_IMAGE, "command": ["true"], "max_duration_s": 60})
        failing = client.submit(
            {"image": SAMPLE_IMAGE, "command": ["sh", "-c", "exit 3"], "max_duration_s": 60}
        )
        long = client.submit(
            {"image": SAMPLE_IMAGE, "command": ["sleep", "300"], "max_duration_s": 600}
        )
        wait_until(lambda: client.job(long.id).status == "running", 120, "a running job")
        client.cancel(long.id)
        ended = ("succeeded", "failed", "cancelled")
        for job in (ok, failing, long):
            wait_until(lambda j=job: client.job(j.id).status in ended, 120, f"job {job.id}")
        # A 4xx too, so the error series carry more than zeros.
        assert 400 <= client.http.get("/v1/jobs/no-such-job").status_code < 500


def query(api: httpx.Client, expr: str) -> dict:
    response = api.get("/query", params={"query": expr})
    body = response.json()
    if response.status_code != 200 or body.get("status") != "success":
        return {"error": body.get("error", response.text)}
    return body["data"]


def all_targets_up(api: httpx.Client, jobs: set[str]) -> bool:
    active = api.get("/targets").json()["data"]["activeTargets"]
    seen = {t["labels"]["job"] for t in active if t["health"] == "up"}
    return jobs <= seen


JOBS = {"gateway", "auth-service", "storage-service", "provider-registry", "scheduler"}


def test_every_dashboard_and_alert_expression_returns_data(
    stack: tuple[Path, int], prometheus: httpx.Client
) -> None:
    data_dir, port = stack
    wait_until(lambda: all_targets_up(prometheus, JOBS), 60, "every service scraped")
    run_a_few_jobs(f"http://127.0.0.1:{port}", data_dir)
    # Rates need two scrapes after the jobs; the fleet gauges refresh every 10 s.
    time.sleep(12)

    expressions = promql_expressions()
    alerts = alert_expressions()
    assert len(expressions) >= 40 and len(alerts) >= 4
    failures = []
    for source, expr in [*expressions, *alerts]:
        data = query(prometheus, expr)
        if "error" in data:
            failures.append(f"{source}: does not evaluate: {data['error']}\n  {expr}")
        elif not data["result"]:
            failures.append(f"{source}: no data\n  {expr}")
    assert not failures, f"{len(failures)} of {len(expressions) + len(alerts)}:\n" + "\n".join(
        failures
    )

    groups = prometheus.get("/rules").json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len([r for r in rules if r["type"] == "alerting"]) == len(alerts)
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    # A healthy stack raises nothing.
    firing = [r["name"] for r in rules if r.get("state") not in (None, "inactive")]
    assert firing == []


def test_a_stopped_service_raises_its_alert(
    stack: tuple[Path, int], prometheus: httpx.Client
) -> None:
    data_dir, _ = stack
    ports = json.loads((data_dir / "ports.json").read_text())
    storage = next(
        psutil.Process(c.pid)
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == ports["storage_service"] and c.pid
    )
    storage.kill()

    def service_down_alert() -> bool:
        alerts = prometheus.get("/alerts").json()["data"]["alerts"]
        return any(
            a["labels"].get("alertname") == "ServiceDown"
            and a["labels"].get("job") == "storage-service"
            for a in alerts
        )

    wait_until(service_down_alert, 60, "the ServiceDown alert for storage-service")
