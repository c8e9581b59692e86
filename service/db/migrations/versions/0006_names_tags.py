"""Names and tags on models and datasets; a build's separate evaluation dataset and the build
that computes its sensitivity; sweeps (a set of builds, one per variant).

Tags are stored as one text ``,a,b,`` (sorted, empty: ``""``) so that a tag filter is a plain
``LIKE`` on SQLite and PostgreSQL alike.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-11 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_NAMED = ("models", "datasets")


def upgrade() -> None:
    for table in _NAMED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("name", sa.String(length=200), nullable=True))
            batch.add_column(sa.Column("tags", sa.Text(), nullable=False, server_default=""))
    with op.batch_alter_table("builds") as batch:
        batch.add_column(sa.Column("eval_dataset_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("sensitivity_build_id", sa.String(length=32), nullable=True))
        batch.create_index(batch.f("ix_builds_eval_dataset_id"), ["eval_dataset_id"])
        batch.create_foreign_key(
            batch.f("fk_builds_eval_dataset_id_datasets"), "datasets", ["eval_dataset_id"], ["id"]
        )
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("dataset_id", sa.String(length=64), nullable=False),
        sa.Column("eval_dataset_id", sa.String(length=64), nullable=True),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("project", sa.String(length=64), nullable=False, server_default="default"),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_index(op.f("ix_sweeps_model_id"), "sweeps", ["model_id"])
    op.create_index(op.f("ix_sweeps_created_at"), "sweeps", ["created_at"])
    op.create_index(op.f("ix_sweeps_project"), "sweeps", ["project"])


def downgrade() -> None:
    op.drop_index(op.f("ix_sweeps_project"), table_name="sweeps")
    op.drop_index(op.f("ix_sweeps_created_at"), table_name="sweeps")
    op.drop_index(op.f("ix_sweeps_model_id"), table_name="sweeps")
    op.drop_table("sweeps")
    with op.batch_alter_table("builds") as batch:
        batch.drop_constraint(batch.f("fk_builds_eval_dataset_id_datasets"), type_="foreignkey")
        batch.drop_index(batch.f("ix_builds_eval_dataset_id"))
        batch.drop_column("sensitivity_build_id")
        batch.drop_column("eval_dataset_id")
    for table in reversed(_NAMED):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tags")
            batch.drop_column("name")
