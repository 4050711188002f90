"""`provider-daemon status` and `price` for people: the platform's view of this machine
as tables."""

from typing import Any

from rich.console import Console, Group
from rich.table import Table

from provider_daemon.agent_api import ProviderStatus


def _num(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{digits}f}{unit}"


def render(status: ProviderStatus, console: Console) -> None:
    p = status.provider
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    state = p["state"] + (
        f" (suspended: {p['suspended_reason']})" if p.get("suspended_reason") else ""
    )
    rows = [
        ("provider", f"{p['name']} ({p['id']})"),
        ("state", state),
        ("region", p.get("region") or "-"),
        ("labels", ", ".join(f"{k}={v}" for k, v in (p.get("labels") or {}).items()) or "-"),
        ("reliability", f"{p['reliability']:.3f} (uptime {p['uptime'] * 100:.2f}%)"),
        ("last heartbeat", str(p.get("last_heartbeat_at") or "-")),
        ("tasks running", str(len(status.running_tasks))),
        ("tasks ended", str(status.tasks_ended)),
        ("earned", f"{status.earned} credits (after the platform's fee)"),
    ]
    if p.get("simulated"):
        rows.insert(2, ("GPUs", "simulated"))
    for key, value in rows:
        summary.add_row(key, value)

    gpus = Table(title="GPUs", title_justify="left")
    for column in (
        "#",
        "model",
        "VRAM",
        "price/h",
        "task",
        "util",
        "mem",
        "temp",
        "power",
        "health",
    ):
        gpus.add_column(column)
    busy_by_uuid = {u: t["job_id"] for t in status.running_tasks for u in t["gpu_uuids"]}
    for g in p["gpus"]:
        health = "ok" if g["healthy"] else f"[red]{g.get('health_reason') or 'unhealthy'}[/red]"
        gpus.add_row(
            str(g["index"]),
            g["model"],
            f"{g['vram_mb'] / 1024:.0f} GiB",
            str(g["price_per_gpu_hour"]),
            busy_by_uuid.get(g["uuid"], "busy" if g["busy"] else "-"),
            _num(g.get("utilization_pct"), "%"),
            _num(g.get("memory_used_mb"), " MiB"),
            _num(g.get("temperature_c"), " C"),
            _num(g.get("power_w"), " W"),
            health,
        )
    parts: list[Any] = [summary, gpus]
    if status.running_tasks:
        tasks = Table(title="Running tasks", title_justify="left")
        for column in ("job", "attempt", "status", "GPUs", "started"):
            tasks.add_column(column)
        for t in status.running_tasks:
            tasks.add_row(
                t["job_id"],
                str(t["attempt"]),
                t["status"],
                str(len(t["gpu_uuids"])),
                str(t.get("started_at") or "-"),
            )
        parts.append(tasks)
    console.print(Group(*parts))


def prices_by_model(provider: dict[str, Any]) -> dict[str, str]:
    """{model: USD per GPU-hour} as the platform has them (every GPU of a model has the
    same price: join and `price set` both price by model)."""
    return {g["model"]: str(g["price_per_gpu_hour"]) for g in provider["gpus"]}


def render_prices(provider: dict[str, Any], console: Console) -> None:
    table = Table(title="Prices (USD per GPU-hour)", title_justify="left")
    for column in ("model", "GPUs", "price/h"):
        table.add_column(column)
    counts: dict[str, int] = {}
    for g in provider["gpus"]:
        counts[g["model"]] = counts.get(g["model"], 0) + 1
    for model, price in sorted(prices_by_model(provider).items()):
        table.add_row(model, str(counts[model]), price)
    console.print(table)
