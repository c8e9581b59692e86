"""Blob rows: one row per stored blob, locked by whoever links a row to it or deletes it, so a
blob is deleted only when nothing references it (service.store.blobs); indexes on the columns
that reference blobs. Existing blobs get their rows from the rows that reference them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_blobs")),
    )
    op.execute(
        "INSERT INTO blobs (sha256, created_at) "
        "SELECT sha256, CURRENT_TIMESTAMP FROM ("
        "SELECT blob_sha256 AS sha256 FROM calibration_tables "
        "UNION SELECT artifact_sha256 FROM builds WHERE artifact_sha256 IS NOT NULL "
        "UNION SELECT report_sha256 FROM builds WHERE report_sha256 IS NOT NULL"
        ") AS referenced"
    )
    with op.batch_alter_table("builds") as batch:
        batch.create_index(batch.f("ix_builds_artifact_sha256"), ["artifact_sha256"])
        batch.create_index(batch.f("ix_builds_report_sha256"), ["report_sha256"])
    with op.batch_alter_table("calibration_tables") as batch:
        batch.create_index(batch.f("ix_calibration_tables_blob_sha256"), ["blob_sha256"])


def downgrade() -> None:
    with op.batch_alter_table("calibration_tables") as batch:
        batch.drop_index(batch.f("ix_calibration_tables_blob_sha256"))
    with op.batch_alter_table("builds") as batch:
        batch.drop_index(batch.f("ix_builds_report_sha256"))
        batch.drop_index(batch.f("ix_builds_artifact_sha256"))
    op.drop_table("blobs")
