"""Startup housekeeping: remove files that no database row owns.

A crash between publishing a file and committing its row leaves an orphan; so does a crash in
the middle of a build. Work folders of builds that are not running go at once; model, dataset and
blob entries without a row are removed once older than ``grace_s`` (so an upload that another
process is committing right now is left alone). Blobs are deleted as every deletion deletes them,
under their lock and only when nothing references them (:mod:`service.store.blobs`), so a build
publishing the same bytes at this moment keeps its file; a blob a crashed deletion had set aside
is put back first (and removed with the others if nothing references it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select

from service.db import Database
from service.db.models import BuildRow, DatasetRow, ModelRow, TableRow
from service.schemas import BuildStatus
from service.store.blobs import commit_and_release
from service.store.storage import Storage

__all__ = ["remove_orphans"]

log = logging.getLogger(__name__)


def remove_orphans(db: Database, storage: Storage, grace_s: float) -> list[Path]:
    """Remove unowned files (module docstring); returns what was removed."""
    removed = storage.remove_stale_tmp()
    for aside, sha in storage.iter_blobs_aside():
        storage.restore_blob(aside, sha)
    with db.session() as session:
        models = set(session.scalars(select(ModelRow.id)))
        datasets = set(session.scalars(select(DatasetRow.id)))
        running = {
            b
            for b, status in session.execute(select(BuildRow.id, BuildRow.status))
            if BuildStatus(status).running
        }
        blobs: set[str] = set(session.scalars(select(TableRow.blob_sha256)))
        for artifact, report in session.execute(
            select(BuildRow.artifact_sha256, BuildRow.report_sha256)
        ):
            blobs.update(sha for sha in (artifact, report) if sha)
    for entry in storage.entries_older_than(storage.models_dir, grace_s):
        if entry.name not in models:
            storage.remove_entry(entry)
            removed.append(entry)
    for entry in storage.entries_older_than(storage.datasets_dir, grace_s):
        if entry.name not in datasets:
            storage.remove_entry(entry)
            removed.append(entry)
    for entry in storage.entries_older_than(storage.work_root, 0):
        if entry.name not in running:
            storage.remove_entry(entry)
            removed.append(entry)
    limit = time.time() - grace_s
    candidates = [
        blob for blob in storage.iter_blobs() if blob.name not in blobs and _mtime(blob) < limit
    ]
    with db.session() as session:
        for blob in candidates:  # checked again under each blob's lock
            commit_and_release(session, storage, [blob.name])
            if not blob.exists():
                removed.append(blob)
    for path in removed:
        log.info("removed orphan %s", path)
    return removed


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # deleted meanwhile: nothing to do
