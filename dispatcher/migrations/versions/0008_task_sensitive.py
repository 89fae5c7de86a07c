"""sensitive tasks: arguments not shown to viewer API keys

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 08:00:00

Lookups by idempotency key need no new index: the unique constraint on (pool,
idempotency_key) of 0001 is one, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("sensitive", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("sensitive")
