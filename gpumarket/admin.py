"""`gpumarket admin ...`: operator commands that work on the database directly.

The first admin can't be made through the API (nobody could authorise it), so these
commands need what the services have: GPUMARKET_DATABASE_URL, or the data dir of a
local platform started by `gpumarket up`.
"""

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import typer
from pydantic import TypeAdapter, ValidationError
from rich.console import Console

from auth_service import accounts
from auth_service.settings import AuthSettings
from billing import funding
from billing.schemas import CreditAmount
from common.db import make_engine, make_sessionmaker
from common.errors import DomainError
from common.settings import database_url_with_password
from gpumarket.localstack import postgres

admin_app = typer.Typer(help="Operator commands on the marketplace's database.")
console = Console()


def local_database_url(data_dir: Path) -> str:
    """The database of a local platform (`gpumarket up --data-dir`), while it runs."""
    ports = json.loads((data_dir / "ports.json").read_text())
    password = (data_dir / "postgres" / "gpumarket.password").read_text().strip()
    return (
        f"postgresql+asyncpg://{postgres.ROLE}:{password}@{postgres.HOST}:{ports['postgres']}"
        f"/{postgres.DATABASE}"
    )


def _database_url(database_url: str | None, data_dir: Path | None) -> str:
    if database_url:
        return database_url_with_password(database_url)
    if data_dir is not None:
        try:
            return local_database_url(data_dir)
        except (OSError, KeyError, ValueError) as exc:
            raise typer.BadParameter(
                f"no local platform in {data_dir}: {exc}", param_hint="--data-dir"
            ) from exc
    raise typer.BadParameter(
        "set GPUMARKET_DATABASE_URL or pass --data-dir", param_hint="--database-url"
    )


async def create_admin(database_url: str, email: str, password: str) -> dict:
    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine).begin() as session:
            # Settings only for the password rule: no service secrets are needed here.
            settings = AuthSettings(dev_mode=True)
            user = await accounts.create_or_promote_admin(session, settings, email, password)
            return {"id": user.id, "email": user.email, "roles": list(user.roles)}
    finally:
        await engine.dispose()


async def grant_credits(
    database_url: str,
    email: str,
    amount: Decimal,
    reference: str | None = None,
    memo: str | None = None,
) -> dict:
    """Credits the user's balance, once per reference."""
    engine = make_engine(database_url)
    try:
        async with make_sessionmaker(engine).begin() as session:
            user = await accounts.user_by_email(session, email)
            result = await funding.add_credits(
                session, user.id, amount, reference=reference, memo=memo
            )
    finally:
        await engine.dispose()
    return {
        "user_id": user.id,
        "email": user.email,
        "amount": str(amount),
        "reference": result.reference,
        "credited": result.credited,
        "balance": str(result.balance),
    }


def _amount(value: str) -> Decimal:
    try:
        return TypeAdapter(CreditAmount).validate_python(value)
    except ValidationError:
        raise typer.BadParameter(
            "a number of credits above 0, at most 1e9, with up to 6 decimals",
            param_hint="AMOUNT",
        ) from None


@admin_app.command("credit")
def credit(
    email: str = typer.Argument(..., help="The user's email."),
    amount: str = typer.Argument(..., help="Credits to add, e.g. 25 or 12.50."),
    reference: str | None = typer.Option(
        None, help="Credits once per reference (e.g. an invoice number); retries are safe."
    ),
    memo: str | None = typer.Option(None, help="A note kept in the ledger."),
    database_url: str | None = typer.Option(None, envvar="GPUMARKET_DATABASE_URL"),
    data_dir: Path | None = typer.Option(None, help="A local platform's data dir instead."),
) -> None:
    """Tops up a user's credits (there is no payment gateway yet)."""
    value = _amount(amount)
    url = _database_url(database_url, data_dir)
    try:
        result = asyncio.run(grant_credits(url, email, value, reference, memo))
    except DomainError as exc:
        console.print(f"[red]refused:[/] {exc.detail}")
        raise typer.Exit(2) from exc
    if not result["credited"]:
        console.print(f"[yellow]reference {result['reference']} was credited before[/]")
    console.print_json(data=result)


@admin_app.command("create-user")
def create_user(
    email: str = typer.Option(..., help="The admin's email."),
    password: str = typer.Option(
        ...,
        envvar="GPUMARKET_ADMIN_PASSWORD",
        prompt=True,
        hide_input=True,
        confirmation_prompt=True,
        help="Asked for when not given (or set GPUMARKET_ADMIN_PASSWORD).",
    ),
    database_url: str | None = typer.Option(None, envvar="GPUMARKET_DATABASE_URL"),
    data_dir: Path | None = typer.Option(None, help="A local platform's data dir instead."),
) -> None:
    """Creates an admin, or makes an existing user admin (and sets its password)."""
    url = _database_url(database_url, data_dir)
    try:
        user = asyncio.run(create_admin(url, email, password))
    except DomainError as exc:
        field = f"{exc.field}: " if exc.field else ""
        console.print(f"[red]refused:[/] {field}{exc.detail}")
        raise typer.Exit(2) from exc
    console.print_json(data=user)
