"""task logs: where each attempt's log lives (on its agent) and its tail; agents' log URL

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 07:40:00.000000

The logs themselves stay on the agents.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "task_logs",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(length=64), nullable=False),
        sa.Column("log_ref", sa.Text(), nullable=False),
        sa.Column("log_tail", sa.Text(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"]),
        sa.PrimaryKeyConstraint("task_id", "attempt"),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("log_ref", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("log_tail", sa.Text(), nullable=True))
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("log_url", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("log_url")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("log_tail")
        batch_op.drop_column("log_ref")
    op.drop_table("task_logs")
