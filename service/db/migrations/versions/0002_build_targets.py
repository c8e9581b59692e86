"""Build targets: workers report what they can build for; a build records what it asked for, the
worker that claimed it and (in backend/backend_version/compute_capability) what it was built for.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 13:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("targets", sa.JSON(), nullable=False, server_default="[]"))
    with op.batch_alter_table("builds") as batch:
        batch.add_column(
            sa.Column(
                "requested_backend", sa.String(length=32), nullable=False, server_default="auto"
            )
        )
        batch.add_column(sa.Column("worker_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("builds") as batch:
        batch.drop_column("worker_id")
        batch.drop_column("requested_backend")
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("targets")
