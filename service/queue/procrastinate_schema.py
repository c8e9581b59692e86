"""Procrastinate's schema in trtforge's database, and the names trtforge's jobs have there.

:func:`ensure_schema` is trtforge's migration step for Procrastinate's tables and functions
(``procrastinate_*``, next to trtforge's own, which alembic manages): it runs when the queue is
opened (``trtforge serve`` and ``trtforge worker`` start), applies the schema of the installed
Procrastinate once, under an advisory lock, and refuses a schema that lacks the functions the
queue calls. It also creates trtforge's one table beside them, :data:`WORKER_LINKS`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import psycopg
from procrastinate.schema import SchemaManager
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.db import Database
from service.errors import SettingsError, StorageError
from service.schemas import TargetRequest

__all__ = ["TASK", "WORKER_LINKS", "ensure_schema", "queue_name", "raw_connection"]

TASK = "trtforge.build"
"""The task name of every build job (Procrastinate's jobs of other tasks are left alone)."""
_SCHEMA_LOCK = 0x74726670  # "trfp": one process applies the schema at a time
_FUNCTIONS = (
    "procrastinate_defer_jobs_v1",
    "procrastinate_fetch_job_v2",
    "procrastinate_finish_job_v1",
    "procrastinate_retry_job_v2",
    "procrastinate_cancel_job_v1",
    "procrastinate_register_worker_v1",
    "procrastinate_update_heartbeat_v1",
    "procrastinate_prune_stalled_workers_v1",
)
"""Procrastinate's SQL functions this queue calls (their schema version)."""
WORKER_LINKS = "trtforge_procrastinate_workers"
_WORKER_LINKS = f"""
CREATE TABLE IF NOT EXISTS {WORKER_LINKS} (
    worker_id varchar(64) PRIMARY KEY,
    procrastinate_worker_id bigint NOT NULL UNIQUE
        REFERENCES procrastinate_workers(id) ON DELETE CASCADE
)"""
"""Which Procrastinate worker each trtforge worker is (in the database, so that any process, an
API replica or a restarted API that serves remote workers, finds it); a link goes with its
Procrastinate worker (unregistered, or pruned when its heartbeat went stale)."""


def queue_name(backend: str, target: TargetRequest | None) -> str:
    """The Procrastinate queue of builds asking for ``backend`` and ``target``."""
    if target is None:
        return f"trtforge.{backend}"
    digest = hashlib.sha256(target.model_dump_json().encode()).hexdigest()[:16]
    return f"trtforge.{backend}.{digest}"


def ensure_schema(db: Database) -> None:
    """Create Procrastinate's tables and functions unless they exist (idempotent; one process at
    a time). :class:`SettingsError` when they exist from a Procrastinate version without the
    functions this queue calls (apply its migrations); :class:`StorageError` when the database
    refuses."""
    try:
        missing = _apply_schema(db)
    except (SQLAlchemyError, psycopg.Error) as exc:
        raise StorageError(
            f"Cannot apply Procrastinate's schema: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            hint="Check TRTFORGE_DATABASE_URL and the database server's permissions (CREATE on "
            "the schema), or set TRTFORGE_QUEUE=database.",
        ) from exc
    if missing:
        raise SettingsError(
            "The database's Procrastinate schema is older than the installed Procrastinate "
            f"(missing {', '.join(missing)}).",
            hint="Apply Procrastinate's migrations newer than the schema's version (`procrastinate "
            "schema --migrations-path` prints their folder), or set TRTFORGE_QUEUE=database.",
            field="queue",
        )


def _apply_schema(db: Database) -> list[str]:
    """Apply the schema unless it exists; the functions it lacks."""
    with db.engine.begin() as connection:
        conn = _driver(connection.connection.driver_connection)
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        found = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
        missing: list[str] = []
        if found is None or found[0] is None:
            conn.execute(SchemaManager.get_schema())
        else:
            missing = [
                name
                for name in _FUNCTIONS
                if conn.execute("SELECT 1 FROM pg_proc WHERE proname = %s", (name,)).fetchone()
                is None
            ]
        conn.execute(_WORKER_LINKS)
        return missing


def _driver(connection: object) -> psycopg.Connection[Any]:
    if not isinstance(connection, psycopg.Connection):
        raise SettingsError(
            "The Procrastinate queue needs PostgreSQL through psycopg 3.",
            hint="Use a postgresql+psycopg:// database URL, or set TRTFORGE_QUEUE=database.",
            field="queue",
        )
    return connection


def raw_connection(session: Session) -> psycopg.Connection[Any]:
    """The psycopg connection of ``session``'s transaction."""
    return _driver(session.connection().connection.driver_connection)
