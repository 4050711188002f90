"""`provider-daemon join` (enroll this machine, then run), `run`, and the owner's commands
about a joined machine (status, drain, resume, price, leave)."""

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn

from common.logging import configure_logging
from provider_daemon.agent_api import AgentApi
from provider_daemon.config import (
    DEFAULT_CHECK_IMAGE,
    ProviderConfig,
    default_config_path,
    default_docker_host,
    default_work_dir,
    load_config,
    new_machine_id,
    pid_path,
    read_previous,
    save_config,
)
from provider_daemon.containers import Containers
from provider_daemon.daemon import Daemon
from provider_daemon.enroll import (
    build_join_request,
    join,
    parse_labels,
    parse_price_items,
    parse_prices,
)
from provider_daemon.errors import ConfigError, CredentialRejected, DaemonError
from provider_daemon.gpus import open_gpus
from provider_daemon.policy import ContainerPolicy
from provider_daemon.preflight import check_machine
from provider_daemon.status_view import prices_by_model, render, render_prices

T = TypeVar("T")

log = logging.getLogger("provider_daemon")

app = typer.Typer(
    name="provider-daemon",
    help="Sell time on this machine's GPUs on the gpumarket platform.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
price_app = typer.Typer(
    help="This machine's prices per GPU-hour, by GPU model.",
    no_args_is_help=True,
)
app.add_typer(price_app, name="price")

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


async def run_daemon(
    config: ProviderConfig, metrics_port: int | None, config_path: Path | None = None
) -> None:
    """Runs until SIGTERM or SIGINT, then stops every job and exits cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("%s received; stopping", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    gpus = await asyncio.to_thread(open_gpus, config.simulate, config.machine_id)
    pid_file = pid_path(config_path) if config_path else None
    if pid_file is not None:
        pid_file.write_text(f"{os.getpid()}\n")
    try:
        await Daemon(config, gpus, metrics_port=metrics_port).run(stop)
    finally:
        gpus.close()
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


async def enroll_and_run(
    *,
    token: str,
    api: str,
    name: str,
    region: str | None,
    prices: list[str],
    labels: list[str],
    simulate: str | None,
    check_image: str,
    config_path: Path,
    work_dir: Path,
    docker_host: str,
    metrics_port: int | None,
    allow_network: bool | None = None,
) -> None:
    # Re-joining keeps this machine's identity (and its simulated GPUs' UUIDs), and the
    # prices it had for the models that --price does not name.
    previous = read_previous(config_path)
    machine_id = previous.machine_id if previous else new_machine_id()
    # The owner's policy survives a re-join; --allow-network/--no-network changes it.
    policy = previous.policy if previous else ContainerPolicy()
    if allow_network is not None:
        policy = policy.model_copy(update={"network": allow_network})
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
        prices=parse_prices(prices, inventory, previous.prices if previous else None),
        labels=parse_labels(labels),
        policy=policy,
    )
    # Prove the machine can run a container on its GPUs before spending the join token
    # on one that could not run anything.
    engine = Containers(docker_host)
    try:
        report = await check_machine(engine, inventory, check_image)
        log.info("machine check passed: %s", report)
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
        labels=body["labels"],
        check_image=check_image,
        work_dir=work_dir,
        docker_host=docker_host,
        metrics_port=metrics_port,
        policy=policy,
        cpu_count=body["cpu_count"],
        memory_mb=body["memory_mb"],
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
    await run_daemon(config, metrics_port, config_path)


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
            help="MODEL=USD_PER_GPU_HOUR, repeatable (default: the price from an earlier "
            "join or `price set`, else 0.5).",
        ),
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option("--label", help="KEY=VALUE a job can require, repeatable."),
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
    check_image: Annotated[
        str,
        typer.Option("--check-image", help="Image for the machine check at join and start."),
    ] = DEFAULT_CHECK_IMAGE,
    allow_network: Annotated[
        bool | None,
        typer.Option(
            "--allow-network/--no-network",
            help="Whether jobs that ask for network access (egress) may run here "
            "(default: as at the last join, else no). The other rules (images, root, "
            "runtime) are in the config file's `policy`.",
        ),
    ] = None,
) -> None:
    """Enroll this machine with a join token, save its config, then run the daemon."""
    _main(
        enroll_and_run(
            token=token,
            api=api,
            name=name or socket.gethostname(),
            region=region,
            prices=price or [],
            labels=label or [],
            simulate=simulate,
            check_image=check_image,
            config_path=config or default_config_path(),
            work_dir=(work_dir or default_work_dir()).expanduser().resolve(),
            docker_host=docker_host or default_docker_host(),
            metrics_port=metrics_port,
            allow_network=allow_network,
        )
    )


@app.command("run")
def run_command(config: ConfigOption = None, metrics_port: MetricsPortOption = None) -> None:
    """Run the daemon from the config that `join` saved."""

    async def start() -> None:
        path = config or default_config_path()
        loaded = load_config(path)
        port = metrics_port if metrics_port is not None else loaded.metrics_port
        await run_daemon(loaded, port, path)

    _main(start())


@app.command("status")
def status_command(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="The raw status as JSON.")] = False,
) -> None:
    """What the platform sees of this machine: GPUs, state, running tasks, earnings."""

    async def show() -> None:
        status = await _with_agent(config, lambda agent: agent.status())
        if as_json:
            typer.echo(status.model_dump_json(indent=2))
        else:
            render(status, Console())

    _main(show(), quiet=True)


@app.command("drain")
def drain_command(
    config: ConfigOption = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the running tasks have ended.")
    ] = False,
) -> None:
    """Finish the running tasks and take no new ones (until `resume`)."""

    async def drain() -> None:
        await _with_agent(config, lambda agent: agent.drain())
        typer.echo("draining: running tasks finish, no new task is placed here")
        if wait:
            await _with_agent(config, _wait_until_idle)

    _main(drain(), quiet=True)


@app.command("resume")
def resume_command(config: ConfigOption = None) -> None:
    """Take new tasks again after a drain."""

    async def resume() -> None:
        await _with_agent(config, lambda agent: agent.resume())
        typer.echo("resumed: this machine takes new tasks again")

    _main(resume(), quiet=True)


@price_app.command("set")
def price_set_command(
    items: Annotated[
        list[str],
        typer.Argument(
            metavar="MODEL=USD_PER_GPU_HOUR",
            help='New prices, e.g. "RTX 4090=0.45"; models not named keep theirs.',
        ),
    ],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="The prices as JSON.")] = False,
) -> None:
    """Change this machine's prices per GPU-hour, all or nothing.

    Tasks already placed here keep the price they were placed at."""
    path = config or default_config_path()

    async def set_prices() -> None:
        change = parse_price_items(items, option="price set")
        provider = await _with_agent(path, lambda agent: agent.set_prices(change))
        _save_prices(path, provider)
        _show_prices(provider, as_json)

    _main(set_prices(), quiet=True)


@price_app.command("show")
def price_show_command(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="The prices as JSON.")] = False,
) -> None:
    """This machine's prices per GPU-hour as the platform has them."""

    async def show() -> None:
        status = await _with_agent(config, lambda agent: agent.status())
        _show_prices(status.provider, as_json)

    _main(show(), quiet=True)


def _show_prices(provider: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(prices_by_model(provider), indent=2))
    else:
        render_prices(provider, Console())


def _save_prices(path: Path, provider: dict[str, Any]) -> None:
    """Keeps the saved config in step, so joining again keeps these prices."""
    loaded = load_config(path)
    loaded.prices = {m: float(p) for m, p in prices_by_model(provider).items()}
    try:
        save_config(loaded, path)
    except OSError as exc:
        raise ConfigError(
            f"the platform has the new prices, but {path} could not be updated: {exc.strerror}"
        ) from None


@app.command("leave")
def leave_command(
    config: ConfigOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Drain, wait for the running tasks, then take this machine off the platform for
    good: its credential ends, the running daemon stops, the saved config is deleted."""
    path = config or default_config_path()
    if not yes:
        typer.confirm("Take this machine off the platform for good?", abort=True)

    async def leave() -> None:
        async def drain_wait_leave(agent: AgentApi) -> None:
            await agent.drain()
            await _wait_until_idle(agent)
            await agent.leave()

        await _with_agent(path, drain_wait_leave)
        _stop_local_daemon(path)
        path.unlink(missing_ok=True)
        typer.echo(f"left the platform; removed {path}")

    _main(leave(), quiet=True)


async def _with_agent(config: Path | None, call: Callable[[AgentApi], Awaitable[T]]) -> T:
    loaded = load_config(config or default_config_path())
    agent = AgentApi(loaded.api_url, loaded.credential, timeout_s=30.0)
    try:
        return await call(agent)
    finally:
        await agent.aclose()


async def _wait_until_idle(agent: AgentApi, poll_s: float = 2.0) -> None:
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True) as bar:
        task = bar.add_task("waiting for running tasks")
        while True:
            running = (await agent.status()).running_tasks
            if not running:
                return
            bar.update(task, description=f"waiting for {len(running)} running task(s) to end")
            await asyncio.sleep(poll_s)


def _stop_local_daemon(config_path: Path) -> None:
    """SIGTERM to the daemon that runs from this config, if one does (it would stop by
    itself at its next check-in, since its credential has ended)."""
    pid_file = pid_path(config_path)
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
        typer.echo(f"stopped the running daemon (pid {pid})")
    pid_file.unlink(missing_ok=True)


def _main(work: Coroutine[Any, Any, None], quiet: bool = False) -> None:
    # The short commands talk to a person: their retries' log lines would only clutter.
    configure_logging("provider-daemon", level="ERROR" if quiet else "INFO")
    try:
        asyncio.run(work)
    except CredentialRejected as exc:
        typer.echo(f"provider-daemon: {exc}", err=True)
        raise typer.Exit(3) from None
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
