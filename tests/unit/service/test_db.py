from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert, inspect, text
from sqlalchemy.orm import Session

from service.db import Database
from service.db.engine import MIGRATIONS_DIR
from service.db.models import Base, BuildRow, DatasetRow, ModelRow, TableRow
from tests.unit.service.support import DATABASES, database_url


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh, empty database: these tests run the migrations themselves."""
    with database_url(request.param, tmp_path, migrated=False) as url:
        database = Database(url)
        yield database
        database.dispose()


def test_migrations_create_the_schema_of_the_models(db: Database) -> None:
    db.migrate()
    tables = set(inspect(db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], "the models changed without a migration: " + repr(diff)


def test_migrate_is_idempotent(db: Database) -> None:
    db.migrate()
    db.migrate()
    with db.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    newest = max(p.stem.split("_")[0] for p in MIGRATIONS_DIR.glob("versions/0*.py"))
    assert versions == [newest]


def test_an_existing_database_gains_build_targets_and_keeps_its_rows(db: Database) -> None:
    db.migrate("0001")
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO workers (id, hostname, pid, process_tag, slots, started_at, "
                "heartbeat_at) VALUES ('w1', 'h', 1, 't', 2, :now, :now)"
            ),
            {"now": datetime(2026, 12, 1)},
        )
    db.migrate()
    with db.engine.connect() as conn:
        slots, targets, labels = conn.execute(
            text("SELECT slots, targets, labels FROM workers")
        ).one()
    assert slots == 2
    assert (json.loads(targets) if isinstance(targets, str) else targets) == []
    assert (json.loads(labels) if isinstance(labels, str) else labels) == []


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    database.migrate()
    with database.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    database.dispose()


def test_ping_reports_an_unreachable_database() -> None:
    from service.errors import StorageError

    database = Database("postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(StorageError, match="unreachable"):
        database.ping()
    database.dispose()


def _insert_build_of_0002(session: Session, build_id: str, **values: str) -> None:
    """A succeeded build (with its model and dataset) written with the columns revision 0002
    has: the ORM rows have columns added later (core inserts name only the columns given)."""
    session.execute(
        insert(ModelRow).values(
            id="m" * 64,
            filename="m.onnx",
            onnx_filename="model.onnx",
            size_bytes=1,
            external_data=False,
            info={},
            tensor_names=[],
        )
    )
    session.execute(
        insert(DatasetRow).values(
            id="d" * 64,
            sha256="d" * 64,
            filename="d.npz",
            data_filename="dataset.npz",
            format="npz",
            size_bytes=1,
            num_samples=1,
            inputs=[],
            digest="d" * 64,
        )
    )
    session.execute(
        insert(BuildRow).values(
            id=build_id,
            cache_key=build_id,
            model_id="m" * 64,
            dataset_id="d" * 64,
            request={},
            spec_digest="s",
            backend="",
            backend_version="",
            compute_capability="",
            status="succeeded",
            stage_seconds={},
            **values,
        )
    )


def test_an_existing_database_gains_rows_for_its_referenced_blobs(db: Database) -> None:
    db.migrate("0002")
    with db.session() as session:
        _insert_build_of_0002(session, "b1", artifact_sha256="a" * 64, report_sha256="b" * 64)
        session.execute(
            insert(TableRow).values(
                id="t" * 64,
                model_id="m" * 64,
                source="imported",
                algorithm="max",
                parameters={},
                samples=0,
                num_tensors=1,
                digest="d",
                blob_sha256="a" * 64,  # shared with the artifact: one row
                missing_tensors=[],
            )
        )
        session.commit()
    db.migrate()
    with db.engine.connect() as conn:
        shas = conn.execute(text("SELECT sha256 FROM blobs ORDER BY sha256")).scalars().all()
    assert shas == ["a" * 64, "b" * 64]
    indexes = {i["name"] for i in inspect(db.engine).get_indexes("builds")}
    assert {"ix_builds_artifact_sha256", "ix_builds_report_sha256"} <= indexes


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'fresh.db'}")
    try:
        database.migrate()
        with database.session() as session:
            session.execute(text("SELECT 1"))
    finally:
        database.dispose()
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["fresh.db"] == 0o600
    assert all(mode == 0o600 for name, mode in modes.items() if name.startswith("fresh.db")), modes
