"""`gpumarket login`, `logout`, `whoami`, `balance`, `storage`."""

import socket
import sys

import typer
from rich.filesize import decimal
from rich.table import Table

from billing.amounts import show
from gpumarket import credentials
from gpumarket.client import ApiError, Client
from gpumarket.commands.common import (
    JSON_OPTION,
    client,
    err,
    handles_errors,
    out,
    print_json,
)
from gpumarket.credentials import Credentials

app = typer.Typer()
PANEL = "Account"


@app.command(rich_help_panel=PANEL)
@handles_errors
def login(
    api: str = typer.Option(
        credentials.DEFAULT_API, envvar="GPUMARKET_API", help="The platform's API address."
    ),
    email: str | None = typer.Option(None, help="Your account's email [prompted]."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input."
    ),
    api_key: str | None = typer.Option(
        None, "--api-key", help="Save this API key (made elsewhere) instead of logging in."
    ),
    expires_in_days: int = typer.Option(
        90, min=1, max=3650, help="How long the key made for this machine stays valid."
    ),
    as_json: bool = JSON_OPTION,
) -> None:
    """Logs in and keeps an API key for this machine in your config dir (mode 0600)."""
    previous = credentials.load()
    if api_key is not None:
        with Client(api, token=api_key) as api_client:
            me = api_client.me()
        saved = Credentials(api=api, api_key=api_key, email=me.email)
    else:
        email = email or typer.prompt("email")
        password = sys.stdin.readline().rstrip("\n") if password_stdin else None
        password = password or typer.prompt("password", hide_input=True)
        with Client(api) as api_client:
            api_client.login(email, password)
            key = api_client.create_api_key(
                f"gpumarket CLI on {socket.gethostname()}"[:100], expires_in_days=expires_in_days
            )
            api_client.logout()
        saved = Credentials(api=api, api_key=key.key, key_id=key.id, email=email)
    where = credentials.save(saved)
    if previous is not None and previous.key_id and previous.key_id != saved.key_id:
        _revoke(previous)
    if as_json:
        print_json({"api": api, "email": saved.email, "key_id": saved.key_id, "file": str(where)})
    else:
        err.print(f"logged in to {api} as {saved.email}; key saved in {where}", highlight=False)


@app.command(rich_help_panel=PANEL)
@handles_errors
def logout(as_json: bool = JSON_OPTION) -> None:
    """Revokes this machine's API key and forgets it."""
    saved = credentials.load()
    if saved is not None:
        _revoke(saved)
        credentials.forget()
    if as_json:
        print_json({"logged_out": saved is not None, "api": saved.api if saved else None})
    else:
        err.print(f"logged out of {saved.api}" if saved else "not logged in", highlight=False)


def _revoke(saved: Credentials) -> None:
    """Best effort: a key that is already gone, or a platform out of reach, is no reason
    to keep a login the user wants dropped."""
    if not saved.key_id:
        return
    try:
        with Client(saved.api, token=saved.api_key) as api_client:
            api_client.revoke_api_key(saved.key_id)
    except ApiError as exc:
        if exc.status_code not in (401, 404):
            err.print(f"could not revoke the key: {exc.detail}", style="yellow")
    except Exception as exc:
        err.print(f"could not revoke the key: {exc}", style="yellow")


@app.command(rich_help_panel=PANEL)
@handles_errors
def whoami(as_json: bool = JSON_OPTION) -> None:
    """Who the saved key belongs to."""
    with client() as api:
        me = api.me()
        where = api.api_url
    if as_json:
        print_json(me)
    else:
        out.print(f"{me.email} ({', '.join(me.roles)}) on {where}", highlight=False)


@app.command(rich_help_panel=PANEL)
@handles_errors
def balance(as_json: bool = JSON_OPTION) -> None:
    """Your credits: available for new jobs, held for unfinished ones, and earned."""
    with client() as api:
        money = api.balance()
    if as_json:
        print_json(money)
        return
    table = Table("AVAILABLE", "HELD", "EARNED", title="credits", title_justify="left")
    table.add_row(show(money.available), show(money.held), show(money.earnings))
    out.print(table)


@app.command(rich_help_panel=PANEL)
@handles_errors
def storage(as_json: bool = JSON_OPTION) -> None:
    """What you store against your quota: input files, job outputs and logs."""
    with client() as api:
        used = api.storage_usage()
    if as_json:
        print_json(used)
        return
    table = Table(
        "USED", "QUOTA", "FILES", "OUTPUTS", "LOGS", title="storage", title_justify="left"
    )
    sizes = (used.used_bytes, used.quota_bytes, used.files_bytes, used.outputs_bytes)
    table.add_row(*(decimal(n) for n in (*sizes, used.logs_bytes)))
    out.print(table)
    days = used.retention_s / 86400
    err.print(f"kept {days:g} days after upload, then deleted", highlight=False)
