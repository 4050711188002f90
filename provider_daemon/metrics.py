"""Optional /healthz and /metrics for the GPU owner's Prometheus, inside the daemon's loop."""

import asyncio
import logging
import socket
from collections.abc import Callable

import uvicorn
from prometheus_client import Counter, Gauge, make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from common.embedded_server import EmbeddedServer
from common.messages import GpuMetrics
from provider_daemon.errors import DaemonError

log = logging.getLogger(__name__)

TASKS = Counter("provider_daemon_tasks_total", "Job attempts finished, by outcome", ["outcome"])
RUNNING = Gauge("provider_daemon_running_tasks", "Job attempts running now")
GPU_UTILIZATION = Gauge(
    "provider_daemon_gpu_utilization_pct", "GPU utilization in percent", ["uuid"]
)
GPU_MEMORY_USED = Gauge("provider_daemon_gpu_memory_used_mb", "GPU memory used in MB", ["uuid"])
GPU_TEMPERATURE = Gauge("provider_daemon_gpu_temperature_c", "GPU temperature", ["uuid"])
# Jobs' output (logstream.py). Destinations: "live" (published to NATS), "file" (the stored
# log). No job labels: a job's own counts are in its log's markers.
LOG_LINES = Counter(
    "provider_daemon_log_lines_total", "Lines of job output kept, by destination", ["destination"]
)
LOG_BYTES = Counter(
    "provider_daemon_log_bytes_total", "Bytes of job output kept, by destination", ["destination"]
)
LOG_LINES_DROPPED = Counter(
    "provider_daemon_log_lines_dropped_total",
    "Lines of job output kept out of a destination, by reason (rate_limit, cap)",
    ["destination", "reason"],
)
LOG_CAPS_REACHED = Counter(
    "provider_daemon_log_caps_reached_total",
    "Job attempts whose output reached the cap of a destination",
    ["destination"],
)


def record_gpus(metrics: list[GpuMetrics]) -> None:
    for m in metrics:
        if m.utilization_pct is not None:
            GPU_UTILIZATION.labels(m.uuid).set(m.utilization_pct)
        if m.memory_used_mb is not None:
            GPU_MEMORY_USED.labels(m.uuid).set(m.memory_used_mb)
        if m.temperature_c is not None:
            GPU_TEMPERATURE.labels(m.uuid).set(m.temperature_c)


Health = Callable[[], tuple[bool, dict[str, object]]]


def make_app(health: Health) -> Starlette:
    async def healthz(_: Request) -> JSONResponse:
        ok, details = health()
        body = {"status": "ok" if ok else "unhealthy", **details}
        return JSONResponse(body, status_code=200 if ok else 503)

    return Starlette(routes=[Route("/healthz", healthz), Mount("/metrics", make_asgi_app())])


def bind(host: str, port: int) -> socket.socket:
    """Binds early, so a taken port is a clear startup error (uvicorn would exit the process)."""
    try:
        sock = socket.create_server((host, port), reuse_port=False)
    except OSError as exc:
        raise DaemonError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from None
    return sock


async def serve(app: Starlette, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serves on the bound socket until `stop` is set."""
    server = EmbeddedServer(uvicorn.Config(app, log_config=None, lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    stopping.cancel()
    await serving
    sock.close()
