"""Rows that matter to placement record the transaction that last changed them
(capacity_xid), so a scheduler re-reads only what transactions unfinished at its last
look wrote, instead of a fixed window of the last capacity_seq values.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 16:20:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The writing transaction's 64-bit id (xid8, which never wraps) as a bigint: plain
# comparisons and a plain btree index, against pg_snapshot_xmin() cast the same way.
CURRENT_XID = "pg_current_xact_id()::text::bigint"

GPU_COLUMNS = (
    "reserved_job_id, healthy, price_per_hour, model, vram_mb, compute_capability, simulated, index"
)
PROVIDER_COLUMNS = (
    "state, suspended_reason, drain_requested, labels, region, reliability, simulated, "
    "cuda_version, cpu_count, memory_mb"
)


def _trigger(table: str, columns: str, with_xid: bool) -> str:
    new = ", ".join(f"NEW.{c.strip()}" for c in columns.split(","))
    old = ", ".join(f"OLD.{c.strip()}" for c in columns.split(","))
    xid = f"\n    NEW.capacity_xid := {CURRENT_XID};" if with_xid else ""
    return f"""
CREATE OR REPLACE FUNCTION {table}_capacity_seq() RETURNS trigger AS $$
BEGIN
  IF ({new}) IS DISTINCT FROM ({old}) THEN
    NEW.capacity_seq := nextval('capacity_seq');{xid}
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
"""


def upgrade() -> None:
    for table, columns in (("gpus", GPU_COLUMNS), ("providers", PROVIDER_COLUMNS)):
        op.add_column(
            table,
            sa.Column(
                "capacity_xid",
                sa.BigInteger(),
                nullable=False,
                server_default=sa.text(CURRENT_XID),
            ),
        )
        op.create_index(op.f(f"ix_{table}_capacity_xid"), table, ["capacity_xid"], unique=False)
        op.execute(_trigger(table, columns, with_xid=True))


def downgrade() -> None:
    for table, columns in (("gpus", GPU_COLUMNS), ("providers", PROVIDER_COLUMNS)):
        op.execute(_trigger(table, columns, with_xid=False))
        op.drop_index(op.f(f"ix_{table}_capacity_xid"), table_name=table)
        op.drop_column(table, "capacity_xid")
