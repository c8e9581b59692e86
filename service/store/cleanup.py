"""Startup housekeeping: remove files that no database row owns.

A crash between publishing a file and committing its row leaves an orphan; so does a crash in
the middle of a build. Work folders of builds that are not running go at once; model, dataset and
blob entries without a row are removed once older than ``grace_s`` (so an upload that another
process is committing right now is left alone).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from sqlalchemy import select

from service.db import Database
from service.db.models import BuildRow, DatasetRow, ModelRow, TableRow
from service.schemas import BuildStatus
from service.store.storage import Storage

__all__ = ["remove_orphans"]

log = logging.getLogger(__name__)


def remove_orphans(db: Database, storage: Storage, grace_s: float) -> list[Path]:
    """Remove unowned files (module docstring); returns what was removed."""
    removed = storage.remove_stale_tmp()
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
    for blob in storage.iter_blobs():
        if blob.name not in blobs and blob.stat().st_mtime < limit:
            blob.unlink(missing_ok=True)
            removed.append(blob)
    for path in removed:
        log.info("removed orphan %s", path)
    return removed
