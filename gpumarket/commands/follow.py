"""Following a job live: status changes and pulls on stderr, its log lines on stdout,
and an exit code that says how it ended."""

import sys
from datetime import datetime

from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from billing.amounts import show
from gpumarket.client import Client, EndEvent, LogEvent, PullEvent, StatusEvent
from gpumarket.commands.common import err, print_json_line, short
from scheduler import states
from scheduler.schemas import JobOut

# How a job that did not succeed ends the command: its own exit code when it has one,
# else the conventions of `timeout` (124) and of Ctrl-C (130).
EXIT_TIMED_OUT, EXIT_CANCELLED, EXIT_FAILED = 124, 130, 1


def exit_code(job: JobOut) -> int:
    if job.status == states.SUCCEEDED:
        return 0
    if job.exit_code:
        return job.exit_code
    return {states.TIMED_OUT: EXIT_TIMED_OUT, states.CANCELLED: EXIT_CANCELLED}.get(
        job.status, EXIT_FAILED
    )


def describe(job: JobOut) -> str:
    """One line on where the job stands."""
    attempt = f" (attempt {job.attempt + 1})" if job.attempt else ""
    if job.status == states.QUEUED:
        if job.waiting_reason:
            return f"queued{attempt}: {job.waiting_reason}"
        if job.queue is not None:
            start = job.queue.estimated_start_at
            eta = f", starts ~{_clock(start)}" if start else ""
            return f"queued{attempt}: {job.queue.position} job(s) ahead{eta}"
        return f"queued{attempt}"
    if job.status == states.ASSIGNED:
        price = f" at {show(job.price_per_gpu_hour)}/GPU-hour" if job.price_per_gpu_hour else ""
        gpus = f"{job.resources.gpus} x {job.gpu_model}" if job.gpu_model else "GPUs"
        return f"assigned{attempt}: {gpus} on machine {job.provider_id}{price}"
    if job.status == states.RUNNING:
        return f"running{attempt}"
    ending = job.status.replace("_", " ")
    if job.exit_code is not None:
        ending += f", exit code {job.exit_code}"
    if job.failure_reason and job.status != states.SUCCEEDED:
        ending += f": {job.failure_reason}"
    if job.cost is not None and job.cost.settled:
        ending += f" (charged {show(job.cost.charged)} credits)"
    return ending


def _clock(at: datetime) -> str:
    return at.astimezone().strftime("%H:%M:%S")


class PullBar:
    """One progress bar per image pull, shown while the machine pulls."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("pulling {task.fields[image]}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[layers]}"),
            console=err,
            transient=True,
        )
        self.task: TaskID | None = None

    def update(self, event: PullEvent) -> None:
        if event.status != "pulling":
            self.stop()
            if event.status == "failed":
                err.print(f"pulling {event.image} failed", style="yellow")
            return
        layers = f"{event.layers_done}/{event.layers_total} layers"
        total = event.bytes_total or None
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("", total=total, image=event.image, layers="")
        self.progress.update(self.task, completed=event.bytes_done, total=total, layers=layers)

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()
            self.progress.remove_task(self.task)
            self.task = None


def follow(client: Client, job_id: str, as_json: bool = False, logs_only: bool = False) -> JobOut:
    """Shows the job's events until it ends; returns it as it ended."""
    pulls = PullBar()
    attempt: int | None = None
    try:
        for event in client.events(job_id):
            if as_json:
                if not logs_only or isinstance(event, LogEvent):
                    print_json_line(event)
            elif isinstance(event, LogEvent):
                pulls.stop()
                if attempt is not None and event.attempt != attempt:
                    err.print(f"--- attempt {event.attempt + 1} ---", style="dim")
                attempt = event.attempt
                sys.stdout.write(event.line + "\n")
                sys.stdout.flush()
            elif isinstance(event, PullEvent):
                if not logs_only:
                    pulls.update(event)
            elif isinstance(event, StatusEvent):
                pulls.stop()
                # The end is told once, below, with what it cost.
                if not logs_only and event.job.status not in states.TERMINAL:
                    err.print(f"[bold]{short(job_id)}[/] {describe(event.job)}", highlight=False)
            elif isinstance(event, EndEvent):
                break
    finally:
        pulls.stop()
    job = client.job(job_id)
    if not as_json and not logs_only:
        err.print(f"[bold]{short(job_id)}[/] {describe(job)}", highlight=False)
    return job
