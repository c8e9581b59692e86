"""Linking rows to blobs and deleting blobs, safely against each other.

Blobs are content-addressed, so two builds whose artifacts are byte-identical share one file.
Deleting one build must then keep the file for the other, even while the other is publishing
it. Every blob has a :class:`~service.db.models.BlobRow`, and both sides take its lock inside
their own transaction:

* publishing (:func:`place_blob`): lock the row, put the file in place (or keep the one there),
  then the caller writes the rows that reference it and commits: the lock is held until then;
* deleting (:func:`commit_and_release`): the caller removes its references, then, per blob,
  lock the row and count what still references it (tables, builds); only an unreferenced blob
  loses its row and has its file set aside, and the file is removed once that commit succeeded
  (restored if it failed).

Either the publisher commits first, and the deleter's count (run after it obtained the lock)
sees the new reference, or the deleter commits first, and the publisher, which waited for the
lock, finds the file gone and stores its own copy. The lock is the row itself: ``SELECT ... FOR
UPDATE`` on PostgreSQL; on SQLite the upsert that creates the row takes the database's write
lock, which serializes every writer until its commit.

A crash between setting a file aside and committing leaves ``blobs/<aa>/.<sha>.deleting-*``;
:func:`service.store.cleanup.remove_orphans` restores it (and deletes it later if nothing
references it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.db.models import BlobRow, BuildRow, TableRow
from service.errors import StorageError
from service.store.storage import BlobRef, Storage

__all__ = ["blob_referenced", "commit_and_release", "lock_blob", "place_blob"]

_LOCK_ATTEMPTS = 20


def lock_blob(session: Session, sha256: str) -> None:
    """Hold ``sha256``'s row lock until the session's transaction ends (creating the row)."""
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    upsert = insert(BlobRow).values(sha256=sha256).on_conflict_do_nothing(index_elements=["sha256"])
    for _ in range(_LOCK_ATTEMPTS):
        session.execute(upsert)
        locked = session.execute(
            select(BlobRow.sha256).where(BlobRow.sha256 == sha256).with_for_update()
        ).first()
        if locked is not None:
            return
        # a deleter removed the row between our upsert and our lock: create it again
    raise StorageError(f"Cannot lock blob {sha256[:12]}: it is deleted and re-created repeatedly.")


def blob_referenced(session: Session, sha256: str) -> bool:
    """Whether a calibration table or a build (artifact or report) references the blob."""
    tables = select(func.count()).select_from(TableRow).where(TableRow.blob_sha256 == sha256)
    builds = (
        select(func.count())
        .select_from(BuildRow)
        .where(or_(BuildRow.artifact_sha256 == sha256, BuildRow.report_sha256 == sha256))
    )
    return bool(session.scalar(tables) or session.scalar(builds))


def place_blob(session: Session, storage: Storage, path: Path, sha256: str | None = None) -> BlobRef:
    """Move ``path`` into the blob store under the blob's lock, in the caller's transaction.

    The caller then adds the rows that reference the blob and commits (which releases the
    lock); until then no deleter can remove the file. ``path`` is gone afterwards either way.
    """
    try:
        sha = sha256 or storage.hash_file(path)
        lock_blob(session, sha)
        return storage.adopt_blob(path, sha)
    finally:
        path.unlink(missing_ok=True)


def commit_and_release(session: Session, storage: Storage, shas: Iterable[str]) -> None:
    """Commit the caller's transaction, which dropped references to ``shas``, deleting the blobs
    that nothing references any more (module docstring). On any error it rolls back, keeps every
    file and raises."""
    aside: list[tuple[str, Path]] = []
    try:
        session.flush()
        for sha in sorted(set(shas)):  # one order everywhere: no lock cycles between deleters
            lock_blob(session, sha)
            if blob_referenced(session, sha):
                continue
            session.execute(delete(BlobRow).where(BlobRow.sha256 == sha))
            moved = storage.set_blob_aside(sha)
            if moved is not None:
                aside.append((sha, moved))
        session.commit()
    except BaseException:
        session.rollback()
        for sha, moved in aside:
            storage.restore_blob(moved, sha)
        raise
    for _, moved in aside:
        moved.unlink(missing_ok=True)
