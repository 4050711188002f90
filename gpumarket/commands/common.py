"""What every requester command shares: the client from the saved login, errors turned
into one clear line and an exit code, JSON for scripts, progress bars for transfers."""

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import httpx
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from common.ids import is_uuid
from gpumarket import credentials
from gpumarket.client import ApiError, Client, TransferError
from gpumarket.credentials import CredentialsError

# Data goes to stdout (tables, JSON, log lines); talk and progress to stderr, so a
# command's output can be piped or parsed whatever it prints along the way.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")
# Exit codes: 1 for a refusal or failure, 2 for bad input (as for a bad option).
FAILED, BAD_INPUT = 1, 2

P = ParamSpec("P")
R = TypeVar("R")


def fail(message: str, code: int = FAILED) -> typer.Exit:
    err.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def explain(exc: ApiError) -> str:
    if exc.status_code == 401:
        return f"{exc.detail} (run `gpumarket login`)"
    if exc.field and exc.field not in exc.detail:
        return f"{exc.field}: {exc.detail}"
    return exc.detail


def handles_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turns the platform's refusals and unreachable servers into one line each."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except ApiError as exc:
            code = BAD_INPUT if exc.status_code in (400, 422) else FAILED
            raise fail(explain(exc), code) from None
        except httpx.TransportError as exc:
            raise fail(f"cannot reach the platform: {exc}") from None
        except (TransferError, CredentialsError) as exc:
            raise fail(str(exc)) from None

    return run


def client() -> Client:
    saved = credentials.load()
    if saved is None:
        raise fail("not logged in: run `gpumarket login --api URL` first")
    return Client(saved.api, token=saved.api_key)


def print_json(value: BaseModel | Sequence[BaseModel] | dict[str, Any]) -> None:
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json")
    elif isinstance(value, dict):
        data = value
    else:
        data = [item.model_dump(mode="json") for item in value]
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def print_json_line(value: BaseModel) -> None:
    sys.stdout.write(value.model_dump_json() + "\n")
    sys.stdout.flush()


def resolve_job(client: Client, ref: str) -> str:
    """A job id from its id or the start of it (as `git` takes a short hash)."""
    if is_uuid(ref):
        return ref
    matches = [job.id for job in client.jobs(limit=1000) if job.id.startswith(ref.lower())]
    if not matches:
        raise fail(f"no job of yours has an id starting with {ref!r}")
    if len(matches) > 1:
        raise fail(f"{ref!r} is the start of {len(matches)} job ids; give more of it")
    return matches[0]


@contextmanager
def transfer_bar(what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar of bytes on stderr; yields the function that advances it."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda moved: progress.advance(task, moved)


def short(job_id: str | None) -> str:
    return job_id[:8] if job_id else "-"
