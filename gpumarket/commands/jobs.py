"""`gpumarket submit`, `jobs`, `job`, `logs`, `cancel`, `download`."""

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import typer
from rich import filesize
from rich.table import Table

from billing.amounts import show
from gateway.schemas import OutputOut
from gpumarket.client import ApiError, Client
from gpumarket.commands.common import (
    BAD_INPUT,
    JSON_OPTION,
    client,
    err,
    fail,
    handles_errors,
    out,
    print_json,
    resolve_job,
    short,
    transfer_bar,
)
from gpumarket.commands.follow import describe, exit_code, follow
from gpumarket.jobfile import JobFile, JobFileError, LocalInput, load_job_file
from scheduler import states
from scheduler.schemas import JobOut

app = typer.Typer()
PANEL = "Jobs"


@app.command(rich_help_panel=PANEL)
@handles_errors
def submit(
    job_file: Path = typer.Argument(..., help="The job's YAML file (see examples/README.md)."),
    follow_: bool = typer.Option(
        False,
        "--follow",
        "-f",
        help="Show status and log lines live, download the outputs (to the file's "
        "`outputs`), and exit with the job's exit code.",
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Uploads the job file's inputs and submits the job."""
    try:
        job_file_ = load_job_file(job_file)
    except JobFileError as exc:
        err.print(str(exc), highlight=False, markup=False)
        raise typer.Exit(BAD_INPUT) from None
    with client() as api:
        file_ids = upload_inputs(api, job_file_.inputs)
        job = _submit(api, job_file_, file_ids)
        if not follow_:
            if as_json:
                print_json(job)
            else:
                out.print(job.id)
            return
        if not as_json:
            err.print(f"submitted job [bold]{job.id}[/]", highlight=False)
        ended = follow(api, job.id, as_json)
        if job_file_.outputs is not None:
            download_all(api, ended.id, job_file_.outputs, quiet=as_json)
    raise typer.Exit(exit_code(ended))


def upload_inputs(api: Client, inputs: list[LocalInput]) -> dict[str, str]:
    """Each local input uploaded once; returns its file id by its path in /inputs."""
    if not inputs:
        return {}
    file_ids = {}
    with transfer_bar("uploading inputs", sum(i.size for i in inputs)) as advance:
        for item in inputs:
            file_ids[item.dest] = api.upload(item.source, Path(item.dest).name, advance).file_id
    return file_ids


def _submit(api: Client, job_file: JobFile, file_ids: dict[str, str]) -> JobOut:
    """The platform's refusal of a field points at the file's line, like a local one."""
    try:
        return api.submit(job_file.job_spec(file_ids))
    except ApiError as exc:
        where = job_file.location(exc.field) if exc.field else None
        if exc.status_code != 422 or where is None:
            raise
        line, column = where
        err.print(f"{job_file.path}:{line}:{column}: {exc.field}: {exc.detail}", markup=False)
        raise typer.Exit(BAD_INPUT) from None


@app.command("jobs", rich_help_panel=PANEL)
@handles_errors
def list_jobs(
    status: str | None = typer.Option(
        None, help=f"Only jobs in this state: {', '.join(states.ALL)}."
    ),
    array: str | None = typer.Option(None, help="Only the jobs of this job array."),
    limit: int = typer.Option(50, min=1, max=1000, help="At most this many, newest first."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Your jobs, newest first."""
    if status is not None and status not in states.ALL:
        raise fail(f"--status: {status!r} is not one of {', '.join(states.ALL)}", BAD_INPUT)
    with client() as api:
        jobs = api.jobs(status=status, array=array, limit=limit)
    if as_json:
        print_json(jobs)
        return
    table = Table("ID", "STATUS", "IMAGE", "GPUS", "PRICE/H", "COST", "SUBMITTED", "RAN")
    for job in jobs:
        gpus = (
            f"{job.resources.gpus} x {job.gpu_model}" if job.gpu_model else str(job.resources.gpus)
        )
        table.add_row(
            short(job.id),
            job.status,
            job.image,
            gpus,
            show(job.price_per_gpu_hour) if job.price_per_gpu_hour else "-",
            show(job.cost.charged) if job.cost and job.cost.settled else "-",
            _ago(job.created_at),
            _ran(job),
        )
    out.print(table)


@app.command("job", rich_help_panel=PANEL)
@handles_errors
def show_job(
    job: str = typer.Argument(..., help="The job's id, or the start of it."),
    as_json: bool = JSON_OPTION,
) -> None:
    """One job: where it stands (queue position, machine), what it costs."""
    with client() as api:
        found = api.job(resolve_job(api, job))
    if as_json:
        print_json(found)
        return
    table = Table.grid(padding=(0, 2))
    rows = {
        "id": found.id,
        "status": describe(found),
        "image": found.image,
        "command": " ".join(found.command),
        "gpus": f"{found.resources.gpus}" + (f" x {found.gpu_model}" if found.gpu_model else ""),
        "machine": found.provider_id or "-",
        "price ceiling": _credits(found.max_price_per_gpu_hour, "/GPU-hour"),
        "price": _credits(found.price_per_gpu_hour, "/GPU-hour"),
        "held": _credits(found.cost.held if found.cost else None),
        "charged": _credits(found.cost.charged if found.cost else None),
        "max duration": f"{found.max_duration_s} s",
        "submitted": found.created_at.astimezone().isoformat(timespec="seconds"),
        "ran": _ran(found),
    }
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", value)
    out.print(table)


@app.command(rich_help_panel=PANEL)
@handles_errors
def logs(
    job: str = typer.Argument(..., help="The job's id, or the start of it."),
    follow_: bool = typer.Option(False, "--follow", "-f", help="Keep printing lines live."),
    as_json: bool = typer.Option(
        False, "--json", help="With --follow: one JSON object per line (attempt, line)."
    ),
) -> None:
    """The job's log (its current attempt's; every attempt's with --follow)."""
    with client() as api:
        job_id = resolve_job(api, job)
        if follow_:
            follow(api, job_id, as_json, logs_only=True)
            return
        text = api.logs(job_id)
    if as_json:
        print_json({"job_id": job_id, "lines": text.splitlines()})
    else:
        out.file.write(text)


@app.command(rich_help_panel=PANEL)
@handles_errors
def cancel(
    job: str = typer.Argument(..., help="The job's id, or the start of it."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Cancels the job in whatever state it is (a finished job stays as it ended)."""
    with client() as api:
        cancelled = api.cancel(resolve_job(api, job))
    if as_json:
        print_json(cancelled)
    else:
        err.print(f"[bold]{short(cancelled.id)}[/] {describe(cancelled)}", highlight=False)


@app.command(rich_help_panel=PANEL)
@handles_errors
def download(
    job: str = typer.Argument(..., help="The job's id, or the start of it."),
    directory: Path | None = typer.Argument(None, help="Where to put them [default: ./JOB_ID]."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Downloads what the job wrote to /outputs, each file checked against its sha256."""
    with client() as api:
        job_id = resolve_job(api, job)
        saved = download_all(api, job_id, directory or Path(job_id), quiet=as_json)
    if as_json:
        print_json({"job_id": job_id, "files": [_saved(o, p) for o, p in saved]})


def download_all(
    api: Client, job_id: str, directory: Path, quiet: bool = False
) -> list[tuple[OutputOut, Path]]:
    outputs = api.outputs(job_id)
    saved = []
    with transfer_bar("downloading outputs", sum(o.size for o in outputs)) as advance:
        for output in outputs:
            saved.append((output, api.download(output, directory, advance)))
    if not quiet:
        total = filesize.decimal(sum(o.size for o in outputs))
        err.print(f"{len(saved)} output file(s), {total}, in {directory}/", highlight=False)
    return saved


def _saved(output: OutputOut, path: Path) -> dict[str, object]:
    return {"path": output.path, "size": output.size, "sha256": output.sha256, "file": str(path)}


def _credits(amount: Decimal | None, per: str = "") -> str:
    return "-" if amount is None else f"{show(amount)} credits{per}"


def _ago(at: datetime) -> str:
    seconds = int((datetime.now(UTC) - at).total_seconds())
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(seconds, 0)}s ago"


def _ran(job: JobOut) -> str:
    if job.started_at is None:
        return "-"
    end = job.finished_at or datetime.now(UTC)
    return f"{(end - job.started_at).total_seconds():.0f} s"
