"""Billing: accounts, a double-entry ledger kept honest by triggers, job usage, holds.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 23:26:38.509771
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# Each statement alone: asyncpg runs one statement per execute.
TRIGGERS = [
    # Balances follow the entries, one update per account per statement.
    """
CREATE FUNCTION ledger_entries_apply() RETURNS trigger AS $$
BEGIN
  UPDATE billing_accounts a SET balance = a.balance + s.total
    FROM (SELECT account_id, sum(amount) AS total FROM new_entries GROUP BY account_id) s
   WHERE a.id = s.account_id;
  RETURN NULL;
END $$ LANGUAGE plpgsql
""",
    """
CREATE TRIGGER ledger_entries_apply AFTER INSERT ON ledger_entries
  REFERENCING NEW TABLE AS new_entries
  FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_apply()
""",
    # A balance changes only from the trigger above (one level down), never by hand.
    """
CREATE FUNCTION billing_accounts_guard() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    RAISE EXCEPTION 'billing accounts are never deleted';
  END IF;
  IF NEW.kind <> OLD.kind OR NEW.owner_id <> OLD.owner_id
     OR (NEW.balance <> OLD.balance AND pg_trigger_depth() < 2) THEN
    RAISE EXCEPTION 'account balances change only through ledger entries';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql
""",
    """
CREATE TRIGGER billing_accounts_guard BEFORE UPDATE OR DELETE ON billing_accounts
  FOR EACH ROW EXECUTE FUNCTION billing_accounts_guard()
""",
    # At commit, every transfer is two entries that sum to zero and match its amount.
    """
CREATE FUNCTION ledger_transfer_balanced() RETURNS trigger AS $$
DECLARE total numeric; legs int; credited numeric;
BEGIN
  SELECT coalesce(sum(amount), 0), count(*), coalesce(sum(amount) FILTER (WHERE amount > 0), 0)
    INTO total, legs, credited FROM ledger_entries WHERE transfer_id = NEW.id;
  IF total <> 0 OR legs <> 2 OR credited <> NEW.amount THEN
    RAISE EXCEPTION 'ledger transfer % (%) does not balance: % legs summing to %',
      NEW.id, NEW.key, legs, total;
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql
""",
    """
CREATE CONSTRAINT TRIGGER ledger_transfer_balanced AFTER INSERT ON ledger_transfers
  DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW EXECUTE FUNCTION ledger_transfer_balanced()
""",
    """
CREATE FUNCTION ledger_immutable() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION '% rows are immutable: post a correcting transfer instead', TG_TABLE_NAME;
END $$ LANGUAGE plpgsql
""",
    *(
        f"CREATE TRIGGER {table}_immutable BEFORE UPDATE OR DELETE ON {table} "
        "FOR EACH ROW EXECUTE FUNCTION ledger_immutable()"
        for table in ("ledger_entries", "ledger_transfers", "job_usage")
    ),
]


revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "billing_accounts",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("balance", sa.Numeric(precision=20, scale=6), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "kind NOT IN ('available', 'held') OR balance >= 0",
            name=op.f("ck_billing_accounts_no_overdraft"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_billing_accounts")),
        sa.UniqueConstraint("kind", "owner_id", name=op.f("uq_billing_accounts_kind")),
    )
    op.create_table(
        "job_usage",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("provider_id", sa.String(length=36), nullable=False),
        sa.Column("provider_owner_id", sa.String(length=36), nullable=False),
        sa.Column("gpu_model", sa.String(length=128), nullable=True),
        sa.Column("gpus", sa.Integer(), nullable=False),
        sa.Column("price_per_gpu_hour", sa.Numeric(precision=12, scale=6), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_seconds", sa.Float(), nullable=True),
        sa.Column("platform_seconds", sa.Float(), nullable=True),
        sa.Column("clock", sa.String(length=16), nullable=False),
        sa.Column("billed_seconds", sa.Integer(), nullable=False),
        sa.Column("chargeable", sa.Boolean(), nullable=False),
        sa.Column("cost", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column("fee", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_usage")),
        sa.UniqueConstraint("job_id", "attempt", name=op.f("uq_job_usage_job_id")),
    )
    op.create_index("ix_job_usage_created", "job_usage", ["created_at"], unique=False)
    op.create_index(
        "ix_job_usage_provider_created", "job_usage", ["provider_id", "created_at"], unique=False
    )
    op.create_table(
        "ledger_transfers",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("provider_id", sa.String(length=36), nullable=True),
        sa.Column("gpu_model", sa.String(length=128), nullable=True),
        sa.Column("memo", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_transfers")),
        sa.UniqueConstraint("key", name=op.f("uq_ledger_transfers_key")),
    )
    op.create_index("ix_ledger_transfers_job", "ledger_transfers", ["job_id"], unique=False)
    op.create_table(
        "ledger_entries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("transfer_id", sa.BigInteger(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.Numeric(precision=20, scale=6), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("amount <> 0", name=op.f("ck_ledger_entries_non_zero")),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["billing_accounts.id"],
            name=op.f("fk_ledger_entries_account_id_billing_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["transfer_id"],
            ["ledger_transfers.id"],
            name=op.f("fk_ledger_entries_transfer_id_ledger_transfers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
    )
    op.create_index(
        "ix_ledger_entries_account", "ledger_entries", ["account_id", "id"], unique=False
    )
    op.create_index(
        op.f("ix_ledger_entries_transfer_id"), "ledger_entries", ["transfer_id"], unique=False
    )
    op.add_column("jobs", sa.Column("gpu_model", sa.String(length=128), nullable=True))
    op.add_column(
        "jobs", sa.Column("hold_amount", sa.Numeric(precision=20, scale=6), nullable=True)
    )
    op.add_column("jobs", sa.Column("started_seen_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_jobs_unsettled",
        "jobs",
        ["finished_at"],
        unique=False,
        postgresql_where=sa.text("settled_at IS NULL AND hold_amount IS NOT NULL"),
    )
    for statement in TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    for table in ("job_usage", "ledger_transfers", "ledger_entries"):
        op.execute(f"DROP TRIGGER {table}_immutable ON {table}")
    op.execute("DROP TRIGGER ledger_transfer_balanced ON ledger_transfers")
    op.execute("DROP TRIGGER billing_accounts_guard ON billing_accounts")
    op.execute("DROP TRIGGER ledger_entries_apply ON ledger_entries")
    for function in (
        "ledger_immutable",
        "ledger_transfer_balanced",
        "billing_accounts_guard",
        "ledger_entries_apply",
    ):
        op.execute(f"DROP FUNCTION {function}()")
    op.drop_index("ix_jobs_unsettled", table_name="jobs")
    op.drop_column("jobs", "settled_at")
    op.drop_column("jobs", "started_seen_at")
    op.drop_column("jobs", "hold_amount")
    op.drop_column("jobs", "gpu_model")
    op.drop_index(op.f("ix_ledger_entries_transfer_id"), table_name="ledger_entries")
    op.drop_index("ix_ledger_entries_account", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_index("ix_ledger_transfers_job", table_name="ledger_transfers")
    op.drop_table("ledger_transfers")
    op.drop_index("ix_job_usage_provider_created", table_name="job_usage")
    op.drop_index("ix_job_usage_created", table_name="job_usage")
    op.drop_table("job_usage")
    op.drop_table("billing_accounts")
