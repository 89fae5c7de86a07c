"""agents' scoped credentials, the dispatcher's signing key

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("broker_user", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("redis_user", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("redis_password_hash", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("credentials_withdrawn_at", sa.Double(), nullable=True))
        batch_op.add_column(
            sa.Column("protocol_minor", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "dispatcher_keys",
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dispatcher_keys")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("protocol_minor")
        batch_op.drop_column("credentials_withdrawn_at")
        batch_op.drop_column("redis_password_hash")
        batch_op.drop_column("redis_user")
        batch_op.drop_column("broker_user")
