"""What the marketplace sold, counted by the process that settled it (after the commit).
Prometheus sums the replicas: sum by (gpu_model) (rate(gpumarket_revenue_credits_total[1h]))."""

from prometheus_client import Counter

from billing.settlement import Charged

GPU_HOURS_SOLD = Counter(
    "gpumarket_gpu_hours_sold_total", "GPU-hours charged to requesters", ["gpu_model"]
)
REVENUE = Counter("gpumarket_revenue_credits_total", "Credits charged to requesters", ["gpu_model"])
EARNINGS = Counter(
    "gpumarket_provider_earnings_credits_total",
    "Credits earned by providers (the charges less the platform's fee)",
    ["gpu_model"],
)
FEES = Counter(
    "gpumarket_platform_fees_credits_total", "The platform's fee on those charges", ["gpu_model"]
)


def count_charges(charged: list[Charged]) -> None:
    for c in charged:
        GPU_HOURS_SOLD.labels(c.gpu_model).inc(c.gpu_hours)
        REVENUE.labels(c.gpu_model).inc(float(c.cost))
        EARNINGS.labels(c.gpu_model).inc(float(c.cost - c.fee))
        FEES.labels(c.gpu_model).inc(float(c.fee))
