"""Input files get a sha256 (null for older rows); stored_objects record the outputs and
logs storage holds for whom, for the quota and retention.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25 01:51:30.911094
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stored_objects",
        sa.Column("bucket", sa.String(length=16), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("owner_id", sa.String(length=36), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("bucket", "key", name=op.f("pk_stored_objects")),
    )
    op.create_index(
        op.f("ix_stored_objects_created_at"), "stored_objects", ["created_at"], unique=False
    )
    op.create_index(
        "ix_stored_objects_owner_live", "stored_objects", ["owner_id", "deleted_at"], unique=False
    )
    op.add_column("files", sa.Column("sha256", sa.String(length=64), nullable=True))
    op.create_index(op.f("ix_files_created_at"), "files", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_files_created_at"), table_name="files")
    op.drop_column("files", "sha256")
    op.drop_index("ix_stored_objects_owner_live", table_name="stored_objects")
    op.drop_index(op.f("ix_stored_objects_created_at"), table_name="stored_objects")
    op.drop_table("stored_objects")
