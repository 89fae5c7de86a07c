"""agents: when each was judged lost

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 09:00:00

A lost agent keeps its credentials for an hour counted from this moment. Agents judged lost
before it existed have none: the keeper counts theirs from when they were last seen, as
before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lost_at", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("lost_at")
