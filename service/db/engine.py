"""The database: engine, sessions, and migrations applied at startup.

SQLite (the default) runs in WAL mode with a busy timeout, so the API and ``trtforge worker``
processes can share one file; PostgreSQL is used when the URL says so. Migrations run under a
lock (a file lock beside the SQLite file, an advisory lock on PostgreSQL), so processes that start
together do not race.

Connections come from a bounded pool (``db_pool_size`` kept open, up to ``db_max_overflow`` more
under load). A session that waits longer than ``db_pool_timeout_s`` for one raises
:class:`UnavailableError` (503): an overloaded server answers "retry later" instead of hanging.
Sessions are short: open one around the queries, close it before any slow work (serializing,
streaming, reading files), so a connection is never held while its thread waits for something
else. In WAL mode SQLite readers run concurrently with the one writer, so the same pool serves it;
writers queue on the busy timeout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.errors import StorageError, UnavailableError

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = ["MIGRATIONS_DIR", "Database"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_SQLITE_BUSY_TIMEOUT_MS = 30_000
_PG_MIGRATION_LOCK = 0x74726674  # "trft"


class Database:
    """One database, by SQLAlchemy URL. Create once per process; ``dispose()`` at the end.

    ``pool_size`` connections are kept, ``max_overflow`` more are opened under load; a session
    waits at most ``pool_timeout_s`` for one (then :class:`UnavailableError`).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 20,
        max_overflow: int = 20,
        pool_timeout_s: float = 10.0,
    ) -> None:
        self.url: URL = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.pool_timeout_s = pool_timeout_s
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {
                "check_same_thread": False,
                "timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000,
            }
        else:
            kwargs["pool_pre_ping"] = True
        if self.sqlite_path is not None or not self.is_sqlite:
            # in-memory SQLite keeps SQLAlchemy's single-connection pool
            kwargs |= {
                "pool_size": pool_size,
                "max_overflow": max_overflow,
                "pool_timeout": pool_timeout_s,
            }
        self.engine: Engine = create_engine(self.url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """The database of ``settings``, its pool sized by the ``db_*`` settings."""
        return cls(
            settings.resolved_database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout_s=settings.db_pool_timeout_s,
        )

    @classmethod
    def for_worker(cls, settings: Settings, slots: int) -> Database:
        """A small pool of its own for a worker inside ``trtforge serve``: heartbeats and claims
        never wait behind the API's requests, however many clients poll."""
        return cls(
            settings.resolved_database_url,
            pool_size=slots + 2,
            max_overflow=slots + 2,
            pool_timeout_s=settings.db_pool_timeout_s,
        )

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, or None (PostgreSQL, in-memory)."""
        if not self.is_sqlite or not self.url.database or self.url.database == ":memory:":
            return None
        return Path(self.url.database)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session; commit explicitly, anything uncommitted is rolled back on exit.

        Raises :class:`UnavailableError` when no connection frees up within the pool timeout.
        """
        with self._sessions() as session:
            try:
                yield session
            except sa_exc.TimeoutError as exc:  # the pool's, not a statement timeout
                raise self._busy() from exc

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        """A plain connection, rolled back on exit: for reads that need no ORM objects (a few
        columns of a polled row), at about a third of a session's CPU cost. Raises
        :class:`UnavailableError` as :meth:`session` does."""
        try:
            with self.engine.connect() as conn:
                yield conn
        except sa_exc.TimeoutError as exc:  # the pool's, not a statement timeout
            raise self._busy() from exc

    def _busy(self) -> UnavailableError:
        return UnavailableError(
            f"The server is busy: no database connection became free within "
            f"{self.pool_timeout_s:g} s.",
            hint="Retry in a moment. An operator can raise TRTFORGE_DB_POOL_SIZE and "
            "TRTFORGE_DB_MAX_OVERFLOW (or TRTFORGE_DB_POOL_TIMEOUT_S).",
        )

    def ping(self) -> None:
        """Run ``SELECT 1``; raises :class:`StorageError` when the database is unreachable."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise StorageError(
                f"The database is unreachable: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                hint="Check TRTFORGE_DATABASE_URL and that the database server runs.",
            ) from exc

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (the newest by default), creating the database file."""
        from alembic import command
        from alembic.config import Config

        if (path := self.sqlite_path) is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # owner-only, before SQLite creates it (its -wal and -shm files take the same mode)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        try:
            with self._migration_lock(), self.engine.begin() as conn:
                if not self.is_sqlite:
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK}
                    )
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
        except SQLAlchemyError as exc:
            raise StorageError(
                f"Cannot migrate the database: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                hint="Check TRTFORGE_DATABASE_URL and the database server's permissions.",
            ) from exc

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        path = self.sqlite_path
        if path is None:
            yield
            return
        from filelock import FileLock

        with FileLock(str(path) + ".migrate.lock", timeout=120, mode=0o600):
            yield

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()
