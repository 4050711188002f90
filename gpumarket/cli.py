"""`gpumarket`: the operator and requester CLI."""

import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

import typer
from rich.console import Console

from gpumarket.admin import admin_app
from gpumarket.bench import run_jobs_bench
from gpumarket.bench_containers import DEFAULT_COMMAND, run_containers_bench
from gpumarket.bench_heartbeats import run_heartbeats_bench
from gpumarket.bench_passes import DEFAULT_SIZES, run_passes_bench
from gpumarket.bench_scheduling import DECISION_MACHINES, BenchError, Via, run_scheduling_bench
from gpumarket.commands import account, jobs, market
from gpumarket.localstack.process import free_port
from gpumarket.platform import DEFAULT_SIMULATED_GPUS, LocalPlatform
from gpumarket.sample import (
    dev_accounts,
    fund_dev_requester,
    run_sample_job,
    start_local_provider,
)

app = typer.Typer(
    help="GPU marketplace: submit and follow jobs, see the market; run it all locally.",
    no_args_is_help=True,
)
console = Console()
bench_app = typer.Typer(help="Benchmarks that print figures (see BENCHMARKS.md).")
for requester_commands in (account.app, jobs.app, market.app):
    app.add_typer(requester_commands)
app.add_typer(bench_app, name="bench", rich_help_panel="Operators")
app.add_typer(admin_app, name="admin", rich_help_panel="Operators")


def _raise_interrupt(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt


def start_everything(platform: LocalPlatform, console: Console) -> dict[str, dict[str, str]]:
    """Servers, migrations, services and the local provider; returns the dev accounts."""
    with console.status("starting NATS, PostgreSQL, S3 and podman") as status:
        platform.start_servers()
        status.update("migrating the database, preparing the sample image")
        platform.prepare()
        status.update("starting the services")
        platform.start_services()
        status.update("starting the local provider daemon")
        accounts = dev_accounts(platform.data_dir)
        start_local_provider(platform, accounts["provider"])
        platform.write_scrape_targets()
        funded = fund_dev_requester(platform, accounts["requester"])
    console.print(f"dev requester {funded['email']} has {funded['balance']} credits")
    return accounts


@app.command(rich_help_panel="Operators")
def up(
    port: int = typer.Option(8000, help="Port of the gateway (the public API)."),
    data_dir: Path = typer.Option(Path(".gpumarket"), help="Where all state is kept."),
    simulate: str = typer.Option(
        DEFAULT_SIMULATED_GPUS, help="Simulated GPUs of the local provider, MODEL:COUNT."
    ),
    sample: bool = typer.Option(True, help="Run the sample job once everything is up."),
) -> None:
    """Runs the whole marketplace on this machine until Ctrl-C."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    platform = LocalPlatform(data_dir=data_dir.resolve(), gateway_port=port, simulate=simulate)
    try:
        accounts = start_everything(platform, console)
        console.print(
            f"[green]gpumarket ready[/] at {platform.gateway_url} "
            f"(OpenAPI at {platform.gateway_url}/docs; logs in {platform.log_dir}; "
            f"dev accounts in {platform.data_dir / 'dev-accounts.json'}; "
            f"Prometheus targets in {platform.scrape_targets_path})",
            soft_wrap=True,
        )
        if sample:
            run_sample_job(platform.gateway_url, accounts["requester"], console)
        console.print("running; press Ctrl-C to stop")
        signal.pause()
    except KeyboardInterrupt:
        console.print("stopping")
    except Exception as exc:
        console.print(f"[red]gpumarket up failed:[/] {exc}")
        raise typer.Exit(1) from exc
    finally:
        platform.stop()
        console.print("stopped")


@app.command(rich_help_panel="Operators")
def migrate(database_url: str = typer.Option(..., envvar="GPUMARKET_DATABASE_URL")) -> None:
    """Brings the database schema up to date (Alembic upgrade head)."""
    from common.settings import database_url_with_password
    from migrations.runner import upgrade

    upgrade(database_url_with_password(database_url))
    console.print("database is up to date")


@bench_app.command("jobs")
def bench_jobs(
    jobs: int = typer.Option(20, min=1, max=10_000, help="How many jobs to submit at once."),
    simulate: str = typer.Option(
        DEFAULT_SIMULATED_GPUS, help="Simulated GPUs of the local provider, MODEL:COUNT."
    ),
) -> None:
    """Submits trivial jobs to a fresh local platform; prints latencies and throughput."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-") as tmp:
        platform = LocalPlatform(data_dir=Path(tmp), gateway_port=free_port(), simulate=simulate)
        try:
            accounts = start_everything(platform, console)
            run_jobs_bench(platform.gateway_url, accounts["requester"], jobs, console)
        finally:
            platform.stop()


@bench_app.command("heartbeats")
def bench_heartbeats(
    providers: int = typer.Option(10_000, min=1, max=50_000, help="Simulated daemons."),
    interval: float = typer.Option(5.0, min=0.1, help="Seconds between a daemon's heartbeats."),
    duration: float = typer.Option(30.0, min=1, help="Seconds measured, after the warm-up."),
    processes: int | None = typer.Option(
        None, min=1, help="Worker processes for the daemons [default: one per 2,500]."
    ),
) -> None:
    """N daemons' heartbeats against a real registry; prints rate, ingest lag and CPU."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run_heartbeats_bench(providers, interval, duration, processes, console)
    except RuntimeError as exc:
        console.print(f"[red]bench heartbeats failed:[/] {exc}")
        raise typer.Exit(1) from exc


@bench_app.command("scheduling")
def bench_scheduling(
    providers: int = typer.Option(1_000, min=1, max=100_000, help="Simulated providers."),
    jobs: int = typer.Option(5_000, min=1, max=1_000_000, help="Jobs to submit and place."),
    schedulers: int = typer.Option(1, min=1, max=16, help="Scheduler replicas."),
    via: Via = typer.Option(
        Via.gateway,
        help="Submit through the gateway's REST API, or straight to Postgres "
        "and JetStream (the gateway's path minus HTTP).",
    ),
    batch: int = typer.Option(
        1, min=1, max=1_000, help="Jobs per request (POST /v1/jobs/batch when > 1)."
    ),
    concurrency: int = typer.Option(
        32, min=1, max=1_024, help="HTTP connections submitting at once (--via gateway)."
    ),
    daemon_processes: int = typer.Option(
        2, min=1, max=16, help="Processes that play the simulated daemons."
    ),
    timeout: float | None = typer.Option(
        None,
        min=1,
        help="Seconds after the first submit for every job to be assigned "
        "[default: 120 + jobs / 10].",
    ),
    decision_machines: list[int] = typer.Option(
        list(DECISION_MACHINES), min=1, help="Fleet sizes to time one placement decision over."
    ),
    log_dir: Path | None = typer.Option(
        None, help="Copy every process' log here at the end (the run's temp dir is removed)."
    ),
    rate: float | None = typer.Option(
        None,
        min=1,
        help="Requests a second, sent at a steady pace whatever the answers' speed "
        "(--via gateway) [default: each connection sends when answered].",
    ),
) -> None:
    """M jobs onto N simulated providers; prints jobs/s, submit->assigned latency, CPU."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run_scheduling_bench(
            providers, jobs, schedulers, via, batch, concurrency, daemon_processes, timeout,
            decision_machines, console, log_dir, rate,
        )  # fmt: skip
    except (BenchError, RuntimeError) as exc:
        console.print(f"[red]bench scheduling failed:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc


@bench_app.command("passes")
def bench_passes(
    providers: int = typer.Option(1_000, min=1, max=100_000, help="Simulated providers."),
    sizes: list[int] = typer.Option(
        list(DEFAULT_SIZES), "--size", min=1, max=1_000, help="Jobs per pass (repeatable)."
    ),
    reps: int = typer.Option(30, min=1, max=10_000, help="Times each step runs per size."),
) -> None:
    """The cost of one group commit of submissions, one placement pass and one events
    batch, by size."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run_passes_bench(providers, sizes, reps, console)
    except (BenchError, RuntimeError) as exc:
        console.print(f"[red]bench passes failed:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc


@bench_app.command("containers")
def bench_containers(
    jobs: int = typer.Option(
        50, min=1, max=1_000, help="Jobs through the platform; containers through the engine."
    ),
    simulate: str = typer.Option(
        DEFAULT_SIMULATED_GPUS,
        help="Simulated GPUs of the local provider, MODEL:COUNT (one job per GPU at once).",
    ),
    command: str = typer.Option(shlex.join(DEFAULT_COMMAND), help="The command, shell words."),
    array: bool = typer.Option(False, help="Submit the jobs as one job array."),
    timeout: float | None = typer.Option(
        None, min=1, help="Seconds for every platform job to end (default: 120 + 2 x jobs)."
    ),
    log_dir: Path | None = typer.Option(
        None, help="Copy every process' log here at the end (the run's temp dir is removed)."
    ),
) -> None:
    """M short jobs through the platform, M containers through the engine; prints both rates."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with tempfile.TemporaryDirectory(prefix="gpumarket-bench-containers-") as tmp:
        platform = LocalPlatform(
            data_dir=Path(tmp),
            gateway_port=free_port(),
            simulate=simulate,
            # The bench's polling and submissions must not meet the per-principal limit.
            settings={"GPUMARKET_RATE_LIMIT_PER_PRINCIPAL": "1000000/second"},
        )
        try:
            accounts = start_everything(platform, console)
            result = run_containers_bench(
                platform, accounts, jobs, shlex.split(command), array, timeout, console
            )
        except BenchError as exc:
            console.print(f"[red]bench containers failed:[/] {exc}", soft_wrap=True)
            raise typer.Exit(1) from exc
        finally:
            platform.stop()
            if log_dir is not None:
                shutil.copytree(platform.log_dir, log_dir, dirs_exist_ok=True)
                # On stderr: the JSON stays the last line of stdout.
                Console(stderr=True).print(f"logs kept in {log_dir}")
    if result["failed"] or result["engine_failed"]:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
