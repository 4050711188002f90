"""Fleet metrics on the registry's /metrics: daemons behind NAT can't be scraped, so the
registry exports what their heartbeats said.

Scrapes must not wait on Postgres, so a background refresh keeps a snapshot and the
collector only reads it. Each registry replica exports the whole fleet: scrape one, or
aggregate with max by (gpu_uuid).
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from provider_registry.models import DRAINING, LEFT, OFFLINE, ONLINE, Gpu, Provider

STATES = (ONLINE, DRAINING, OFFLINE, LEFT)
GPU_GAUGES = (
    ("gpumarket_gpu_utilization_percent", "GPU utilization, percent", "utilization_pct"),
    ("gpumarket_gpu_memory_used_bytes", "GPU memory in use, bytes", "memory_used_bytes"),
    ("gpumarket_gpu_temperature_celsius", "GPU temperature, degrees Celsius", "temperature_c"),
    ("gpumarket_gpu_power_watts", "GPU power draw, watts", "power_w"),
    ("gpumarket_gpu_healthy", "1 if the GPU may take work, 0 if not", "healthy"),
    ("gpumarket_gpu_busy", "1 if a job holds the GPU", "busy"),
    ("gpumarket_gpu_price_per_hour", "The price asked per GPU-hour, in credits", "price_per_hour"),
)
GPU_LABELS = ["provider_id", "gpu_uuid", "model"]
# A GPU's state for gpumarket_gpus: on a live machine free, busy or unhealthy; else its
# machine's state. GPUs of machines that left are not counted.
FREE, BUSY, UNHEALTHY = "free", "busy", "unhealthy"
GPU_STATES = (FREE, BUSY, UNHEALTHY, DRAINING, OFFLINE)


@dataclass
class GpuSample:
    provider_id: str
    gpu_uuid: str
    model: str
    utilization_pct: float | None
    memory_used_bytes: float | None
    temperature_c: float | None
    power_w: float | None
    healthy: float
    busy: float
    price_per_hour: float


@dataclass
class FleetSnapshot:
    providers_by_state: dict[str, int] = field(default_factory=dict)
    # (model, GPU state) -> count
    gpus_by_state: dict[tuple[str, str], int] = field(default_factory=dict)
    gpus: list[GpuSample] = field(default_factory=list)


async def read_snapshot(session: AsyncSession) -> FleetSnapshot:
    snapshot = FleetSnapshot()
    for state, count in await session.execute(
        select(Provider.state, func.count()).group_by(Provider.state)
    ):
        snapshot.providers_by_state[state] = count
    gpu_state = case(
        (Provider.state != ONLINE, Provider.state),
        (Gpu.reserved_job_id.is_not(None), BUSY),
        (Gpu.healthy.is_(False), UNHEALTHY),
        else_=FREE,
    )
    for model, state, count in await session.execute(
        select(Gpu.model, gpu_state, func.count())
        .join(Provider)
        .where(Provider.state != LEFT)
        .group_by(Gpu.model, gpu_state)
    ):
        snapshot.gpus_by_state[model, state] = count
    # Only live machines: an offline one's last reading would pose as current.
    rows = await session.execute(
        select(
            Gpu.provider_id,
            Gpu.uuid,
            Gpu.model,
            Gpu.utilization_pct,
            Gpu.memory_used_mb,
            Gpu.temperature_c,
            Gpu.power_w,
            Gpu.healthy,
            Gpu.reserved_job_id.is_not(None),
            Gpu.price_per_hour,
        )
        .join(Provider)
        .where(Provider.state.in_([ONLINE, DRAINING]))
    )
    snapshot.gpus = [
        GpuSample(
            provider_id=pid,
            gpu_uuid=uuid,
            model=model,
            utilization_pct=util,
            memory_used_bytes=mem * 2**20 if mem is not None else None,
            temperature_c=temp,
            power_w=power,
            healthy=1.0 if healthy else 0.0,
            busy=1.0 if busy else 0.0,
            price_per_hour=float(price),
        )
        for pid, uuid, model, util, mem, temp, power, healthy, busy, price in rows
    ]
    return snapshot


class FleetCollector(Collector):
    def __init__(self) -> None:
        self.snapshot = FleetSnapshot()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snapshot = self.snapshot
        providers = GaugeMetricFamily("gpumarket_providers", "Providers by state", labels=["state"])
        gpus = GaugeMetricFamily(
            "gpumarket_gpus",
            "GPUs by model and state (free, busy, unhealthy; else their machine's state)",
            labels=["model", "state"],
        )
        for state in STATES:
            providers.add_metric([state], snapshot.providers_by_state.get(state, 0))
        # Every state of every model seen, zeros included, so a model's free GPUs
        # read 0 rather than vanish when the last one is taken.
        for model in sorted({model for model, _ in snapshot.gpus_by_state}):
            for state in GPU_STATES:
                gpus.add_metric([model, state], snapshot.gpus_by_state.get((model, state), 0))
        yield providers
        yield gpus
        for name, doc, attr in GPU_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=GPU_LABELS)
            for sample in snapshot.gpus:
                value = getattr(sample, attr)
                if value is not None:
                    family.add_metric([sample.provider_id, sample.gpu_uuid, sample.model], value)
            yield family


_collector: FleetCollector | None = None


def fleet_collector() -> FleetCollector:
    """The process's one collector (apps may be created several times in one process)."""
    global _collector
    if _collector is None:
        _collector = FleetCollector()
        REGISTRY.register(_collector)
    return _collector
