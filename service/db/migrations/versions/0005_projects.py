"""Projects (tenancy): tokens, models, datasets, calibration tables and builds belong to one
project (service.projects); existing rows land in ``default``, where ids stay the plain digests.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_INDEXED = ("models", "datasets", "calibration_tables", "builds")


def _project() -> sa.Column[str]:
    return sa.Column("project", sa.String(length=64), nullable=False, server_default="default")


def upgrade() -> None:
    for table in _INDEXED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(_project())
            batch.create_index(batch.f(f"ix_{table}_project"), ["project"])
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(_project())


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("project")
    for table in reversed(_INDEXED):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(batch.f(f"ix_{table}_project"))
            batch.drop_column("project")
