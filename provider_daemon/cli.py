"""`provider-daemon join` (enroll this machine, then run) and `provider-daemon run`."""

import asyncio
import logging
import signal
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from common.logging import configure_logging
from provider_daemon.config import (
    ProviderConfig,
    default_config_path,
    default_docker_host,
    default_work_dir,
    load_config,
    new_machine_id,
    read_machine_id,
    save_config,
)
from provider_daemon.containers import Containers
from provider_daemon.daemon import Daemon
from provider_daemon.enroll import build_join_request, join, parse_prices
from provider_daemon.errors import DaemonError
from provider_daemon.gpus import open_gpus

log = logging.getLogger("provider_daemon")

app = typer.Typer(
    name="provider-daemon",
    help="Sell time on this machine's GPUs on the gpumarket platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="Config file (default: $GPUMARKET_PROVIDER_CONFIG or "
        "~/.config/gpumarket/provider.json).",
    ),
]
MetricsPortOption = Annotated[
    int | None, typer.Option("--metrics-port", help="Serve /healthz and /metrics on this port.")
]


async def run_daemon(config: ProviderConfig, metrics_port: int | None) -> None:
    """Runs until SIGTERM or SIGINT, then stops every job and exits cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s received; stopping", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    gpus = await asyncio.to_thread(open_gpus, config.simulate, config.machine_id)
    try:
        await Daemon(config, gpus, metrics_port=metrics_port).run(stop)
    finally:
        gpus.close()


async def enroll_and_run(
    *,
    token: str,
    api: str,
    name: str,
    region: str | None,
    prices: list[str],
    simulate: str | None,
    config_path: Path,
    work_dir: Path,
    docker_host: str,
    metrics_port: int | None,
) -> None:
    # Re-joining keeps this machine's identity (and its simulated GPUs' UUIDs).
    machine_id = read_machine_id(config_path) or new_machine_id()
    gpus = await asyncio.to_thread(open_gpus, simulate, machine_id)
    try:
        inventory = gpus.inventory()
    finally:
        gpus.close()
    body = build_join_request(
        token=token,
        machine_id=machine_id,
        name=name,
        region=region,
        inventory=inventory,
        prices=parse_prices(prices, inventory),
    )
    # Check the container engine before spending the join token on a machine that
    # could not run anything.
    engine = Containers(docker_host)
    try:
        await engine.ping()
    finally:
        engine.close()
    joined = await join(api, body)
    config = ProviderConfig(
        api_url=api.rstrip("/"),
        machine_id=machine_id,
        name=name,
        region=region,
        simulate=simulate,
        prices=body["prices"],
        work_dir=work_dir,
        docker_host=docker_host,
        metrics_port=metrics_port,
        provider_id=joined.provider_id,
        credential=joined.credential,
        nats_url=joined.nats_url,
        heartbeat_interval_s=joined.heartbeat_interval_s,
    )
    save_config(config, config_path)
    log.info(
        "joined as provider %s with %d GPUs; config saved to %s",
        joined.provider_id,
        len(inventory.gpus),
        config_path,
    )
    await run_daemon(config, metrics_port)


@app.command("join")
def join_command(
    token: Annotated[str, typer.Option("--token", help="Join token from the platform.")],
    api: Annotated[str, typer.Option("--api", help="The platform's API URL.")],
    name: Annotated[
        str | None, typer.Option("--name", help="This machine's name (default: hostname).")
    ] = None,
    region: Annotated[str | None, typer.Option("--region")] = None,
    price: Annotated[
        list[str] | None,
        typer.Option(
            "--price",
            help="MODEL=USD_PER_GPU_HOUR, repeatable (default 0.5 for each model).",
        ),
    ] = None,
    simulate: Annotated[
        str | None,
        typer.Option(
            "--simulate",
            help='Simulated GPUs instead of NVML: "MODEL:COUNT[,MODEL:COUNT[:VRAM_GB]]".',
        ),
    ] = None,
    config: ConfigOption = None,
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="Where job files live while they run.")
    ] = None,
    docker_host: Annotated[
        str | None,
        typer.Option(
            "--docker-host",
            help="Docker Engine API URL (default: $DOCKER_HOST, else the local socket).",
        ),
    ] = None,
    metrics_port: MetricsPortOption = None,
) -> None:
    """Enroll this machine with a join token, save its config, then run the daemon."""
    _main(
        enroll_and_run(
            token=token,
            api=api,
            name=name or socket.gethostname(),
            region=region,
            prices=price or [],
            simulate=simulate,
            config_path=config or default_config_path(),
            work_dir=(work_dir or default_work_dir()).expanduser().resolve(),
            docker_host=docker_host or default_docker_host(),
            metrics_port=metrics_port,
        )
    )


@app.command("run")
def run_command(config: ConfigOption = None, metrics_port: MetricsPortOption = None) -> None:
    """Run the daemon from the config that `join` saved."""

    async def start() -> None:
        loaded = load_config(config or default_config_path())
        await run_daemon(loaded, metrics_port if metrics_port is not None else loaded.metrics_port)

    _main(start())


def _main(work: Coroutine[Any, Any, None]) -> None:
    configure_logging("provider-daemon")
    try:
        asyncio.run(work)
    except DaemonError as exc:
        typer.echo(f"provider-daemon: {exc}", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:
        # The details go to the JSON log; the owner gets one line.
        log.error("unexpected error", exc_info=True)
        typer.echo(f"provider-daemon: unexpected error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(2) from None


def main() -> None:
    app(prog_name="provider-daemon")
