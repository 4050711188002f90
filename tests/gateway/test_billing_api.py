"""Money through the public API on the real platform: 402 without funds, a job's hold,
charge and release, the statement in JSON and CSV, earnings, admin credits and totals."""

import csv
import io
from decimal import Decimal

import httpx
import pytest

from gpumarket.client import ApiError, Client
from gpumarket.platform import LocalPlatform
from tests.fixtures.platform import new_user
from tests.gateway.test_jobs_api import job_spec, wait_for


def test_a_requester_without_funds_gets_402_and_nothing_is_queued(
    platform: LocalPlatform,
) -> None:
    broke = new_user(platform, "requester", credits=Decimal(0))
    with pytest.raises(ApiError) as refused:
        broke.submit(job_spec(["true"], max_duration_s=3600, max_price_per_gpu_hour=2))
    assert refused.value.status_code == 402
    body = refused.value.body
    assert (body["required"], body["available"], body["missing"]) == ("2.00", "0.00", "2.00")
    assert "2.00 more credits are needed" in body["detail"]
    with pytest.raises(ApiError) as array_refused:
        broke.request(
            "POST",
            "/v1/jobs/batch",
            json={"template": job_spec(["true"], max_duration_s=36), "count": 10},
        )
    assert array_refused.value.status_code == 402
    assert array_refused.value.body["required"] == "0.10"  # 10 x 1 GPU x 1.00/h x 36 s
    assert broke.request("GET", "/v1/jobs") == []
    assert broke.request("GET", "/v1/billing/balance")["held"] == "0.000000"


def test_a_run_is_held_charged_released_and_itemized(
    platform: LocalPlatform, requester: Client, admin: Client
) -> None:
    before = requester.request("GET", "/v1/billing/balance")
    job = requester.submit(job_spec(["sh", "-c", "sleep 1; echo done"], max_duration_s=360))
    # 1 GPU x 1.00/h ceiling x 360 s.
    assert job.cost and job.cost.model_dump(mode="json") == {
        "currency": "credits",
        "held": "0.100000",
        "charged": "0.000000",
        "released": "0.000000",
        "billed_seconds": 0,
        "settled": False,
    }
    held = requester.request("GET", "/v1/billing/balance")
    assert Decimal(held["available"]) == Decimal(before["available"]) - Decimal("0.1")

    done = wait_for(requester, job.id, lambda j: j.cost and j.cost.settled)
    assert done.status == "succeeded"
    cost, price = done.cost, done.price_per_gpu_hour
    assert cost and price
    charged = (price * cost.billed_seconds / Decimal(3600)).quantize(Decimal("0.000001"))
    assert cost.billed_seconds >= 1
    assert cost.charged == charged
    assert cost.released == Decimal("0.1") - charged
    after = requester.request("GET", "/v1/billing/balance")
    assert after["held"] == "0.000000"
    assert Decimal(after["available"]) == Decimal(before["available"]) - charged

    page = requester.request("GET", "/v1/billing/ledger", params={"limit": 1000})
    mine = [e for e in page["entries"] if e["job_id"] == job.id]
    assert sorted((e["account"], e["kind"]) for e in mine) == sorted(
        [
            ("available", "hold"),
            ("held", "hold"),
            ("held", "charge"),
            ("held", "fee"),
            ("held", "release"),
            ("available", "release"),
        ]
    )
    assert sum(Decimal(e["amount"]) for e in mine) == -charged

    with httpx.Client(base_url=platform.gateway_url) as http:
        response = http.get(
            "/v1/billing/ledger",
            params={"format": "csv", "limit": 1000},
            headers={"Authorization": f"Bearer {requester.token}"},
        )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(r["id"]) for r in rows] == [e["id"] for e in page["entries"]]
    assert {r["kind"] for r in rows if r["job_id"] == job.id} == {
        "hold",
        "charge",
        "fee",
        "release",
    }

    # The local machine's owner earned the charge less the platform's fee.
    owner = Client(platform.gateway_url)
    owner.login("provider@example.com", "sells-gpu-time-1")
    earnings = owner.request("GET", "/v1/billing/earnings")
    [row] = [r for r in earnings["rows"] if r["provider_id"] == done.provider_id]
    assert row["tasks"] >= 1 and Decimal(row["earned"]) > 0
    assert Decimal(row["gross"]) - Decimal(row["fees"]) == Decimal(row["earned"])

    # The scheduler that settled it counted the sale, per GPU model.
    port = platform.port(platform.scheduler_names[0])
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", follow_redirects=True, timeout=10).text
    sold = f'gpumarket_revenue_credits_total{{gpu_model="{done.gpu_model}"}}'
    assert sold in metrics and "gpumarket_gpu_hours_sold_total" in metrics

    totals = admin.request("GET", "/v1/admin/billing/totals")
    assert totals["ledger_balanced"] is True
    assert Decimal(totals["revenue"]) >= charged
    assert any(m["gpu_model"] == done.gpu_model for m in totals["by_model"])


def test_the_statement_pages_back_in_time(requester: Client, admin: Client) -> None:
    me = requester.request("GET", "/v1/me")["id"]
    for i in range(3):
        admin.request("POST", "/v1/admin/billing/credits", json={"user_id": me, "amount": 1 + i})
    first = requester.request("GET", "/v1/billing/ledger", params={"limit": 2})
    assert [e["amount"] for e in first["entries"]] == ["3.000000", "2.000000"]
    rest = requester.request(
        "GET", "/v1/billing/ledger", params={"limit": 2, "before": first["next_before"]}
    )
    assert [e["amount"] for e in rest["entries"]][:1] == ["1.000000"]


def test_admin_credits_once_per_reference_and_names_bad_fields(
    requester: Client, admin: Client
) -> None:
    me = requester.request("GET", "/v1/me")["id"]
    body = {"user_id": me, "amount": "12.5", "reference": "invoice-42", "memo": "welcome"}
    first = admin.request("POST", "/v1/admin/billing/credits", json=body)
    again = admin.request("POST", "/v1/admin/billing/credits", json=body)
    assert (first["credited"], again["credited"]) == (True, False)
    assert first["balance"] == again["balance"]
    assert requester.request("GET", "/v1/billing/balance")["available"] == first["balance"]

    for bad, field in (
        ({**body, "user_id": "00000000-0000-0000-0000-000000000000"}, "user_id"),
        ({**body, "amount": 0}, "amount"),
        ({**body, "amount": "1.0000001"}, "amount"),
        ({**body, "reference": "has spaces"}, "reference"),
        ({**body, "currency": "usd"}, "currency"),
    ):
        with pytest.raises(ApiError) as refused:
            admin.request("POST", "/v1/admin/billing/credits", json=bad)
        assert refused.value.status_code == 422
        assert field in str(refused.value.body["errors"]), refused.value.body

    with pytest.raises(ApiError) as forbidden:
        requester.request("GET", "/v1/billing/balance", params={"user_id": "someone-else"})
    assert forbidden.value.status_code == 403
