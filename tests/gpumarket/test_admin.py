"""`gpumarket admin create-user` on a real PostgreSQL."""

import json

from typer.testing import CliRunner

from gpumarket.cli import app


def create_user(database_url: str, email: str, password: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(
        app,
        ["admin", "create-user", "--email", email],
        env={"GPUMARKET_DATABASE_URL": database_url, "GPUMARKET_ADMIN_PASSWORD": password},
    )


def test_creates_the_first_admin_then_promotes_an_existing_user(unit_database_url: str) -> None:
    made = create_user(unit_database_url, "Root@Example.com", "correct-horse-battery")
    assert made.exit_code == 0, made.output
    user = json.loads(made.output)
    assert user["email"] == "root@example.com" and user["roles"] == ["admin"]
    again = create_user(unit_database_url, "root@example.com", "another-long-secret")
    assert again.exit_code == 0 and json.loads(again.output)["id"] == user["id"]


def test_a_weak_password_is_refused_with_exit_code_2(unit_database_url: str) -> None:
    refused = create_user(unit_database_url, "weak@example.com", "short")
    assert refused.exit_code == 2
    assert "password" in refused.output


def test_without_a_database_it_says_what_to_set() -> None:
    result = CliRunner().invoke(
        app,
        ["admin", "create-user", "--email", "a@example.com"],
        env={"GPUMARKET_ADMIN_PASSWORD": "x" * 12, "GPUMARKET_DATABASE_URL": ""},
    )
    assert result.exit_code == 2
    assert "GPUMARKET_DATABASE_URL" in result.output


def credit(database_url: str, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(
        app, ["admin", "credit", *args], env={"GPUMARKET_DATABASE_URL": database_url}
    )


def test_credit_tops_up_once_per_reference(unit_database_url: str) -> None:
    made = create_user(unit_database_url, "payer@example.com", "correct-horse-battery")
    assert made.exit_code == 0, made.output
    first = credit(unit_database_url, "payer@example.com", "25.5", "--reference", "inv-7")
    assert first.exit_code == 0, first.output
    result = json.loads(first.output)
    assert (result["credited"], result["balance"]) == (True, "25.500000")
    again = credit(unit_database_url, "payer@example.com", "25.5", "--reference", "inv-7")
    assert again.exit_code == 0 and "credited before" in again.output
    more = credit(unit_database_url, "PAYER@example.com", "4.5")
    assert json.loads(more.output)["balance"] == "30.000000"


def test_credit_refuses_a_bad_amount_or_an_unknown_user(unit_database_url: str) -> None:
    for amount in ("0", "-5", "abc", "1.0000001", "NaN"):
        refused = credit(unit_database_url, "--", "payer@example.com", amount)
        assert refused.exit_code == 2 and "AMOUNT" in refused.output, amount
    unknown = credit(unit_database_url, "nobody@example.com", "5")
    assert unknown.exit_code == 2 and "no user with email" in unknown.output
