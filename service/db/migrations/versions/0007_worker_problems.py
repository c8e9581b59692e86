"""What a live worker reports as the reason it takes no builds (a worker on another machine whose
data directory is unusable, or whose build slots keep failing): ``GET /v1/workers`` and ``/readyz``
show it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 16:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("problem", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("problem")
