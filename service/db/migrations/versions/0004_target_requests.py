"""Target requests: workers carry labels; a build records the target it asked for (GPU, TensorRT
version, labels), which a worker's targets and labels must match to claim it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-09 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("requested_target", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.drop_column("requested_target")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("labels")
