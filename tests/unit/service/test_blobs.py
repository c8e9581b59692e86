"""Blobs shared by byte-identical files: publishing and deleting under the blob's lock, on the
real database (SQLite, and PostgreSQL when configured), with the interleavings forced."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from service.db import Database
from service.db.models import BlobRow, BuildRow
from service.store import builds
from service.store.blobs import commit_and_release
from service.store.cleanup import remove_orphans
from service.store.storage import BlobRef, Storage
from tests.unit.service.support import insert_build

ENGINE = b"the same engine bytes, built twice" * 1000
ENGINE_SHA = hashlib.sha256(ENGINE).hexdigest()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    store = Storage(tmp_path / "data")
    store.prepare()
    return store


def _publish(db: Database, storage: Storage, build_id: str) -> None:
    """Link ``build_id`` to a fresh copy of ENGINE and a report of its own, as the pipeline does."""
    folder = storage.tmp_dir()
    artifact, report = folder / f"{build_id}.onnx", folder / f"{build_id}.json"
    artifact.write_bytes(ENGINE)
    report.write_bytes(f'{{"build_id": "{build_id}"}}'.encode())
    with db.session() as session:
        builds.link_build_files(
            session,
            storage,
            build_id,
            artifact=artifact,
            artifact_sha256=ENGINE_SHA,
            artifact_filename="m.onnx",
            artifact_metadata={},
            report=report,
        )


@pytest.fixture
def two_builds(db: Database, storage: Storage) -> tuple[str, str]:
    """Build A succeeded with ENGINE; build B is about to publish the same bytes."""
    with db.session() as session:
        insert_build(session, "a" * 32, status="succeeded")
        insert_build(session, "b" * 32, status="evaluating")
        session.commit()
    _publish(db, storage, "a" * 32)
    return "a" * 32, "b" * 32


def _run(target: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def _assert_b_downloadable(db: Database, storage: Storage, build_b: str) -> None:
    with db.session() as session:
        row = session.get_one(BuildRow, build_b)
        assert row.artifact_sha256 == ENGINE_SHA
        path = storage.blob_path(ENGINE_SHA)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == ENGINE_SHA
        assert session.get(BlobRow, ENGINE_SHA) is not None


def test_deleting_a_build_while_another_publishes_the_same_bytes_keeps_them(
    db: Database, storage: Storage, two_builds: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    build_a, build_b = two_builds
    # the publisher holds the blob (file in place, row not committed) while the deletion runs
    placed, go_on = threading.Event(), threading.Event()
    adopt = Storage.adopt_blob

    def adopt_then_wait(self: Storage, path: Path, sha256: str | None = None) -> BlobRef:
        ref = adopt(self, path, sha256)
        if sha256 == ENGINE_SHA and threading.current_thread().name != "MainThread":
            placed.set()
            go_on.wait(10)
        return ref

    monkeypatch.setattr(Storage, "adopt_blob", adopt_then_wait)
    publisher, publish_errors = _run(lambda: _publish(db, storage, build_b))
    assert placed.wait(10)

    def delete_a() -> None:
        with db.session() as session:
            builds.delete_build(session, storage, build_a)

    deleter, delete_errors = _run(delete_a)
    time.sleep(0.5)  # the deletion now waits for the blob's lock
    assert deleter.is_alive()
    go_on.set()
    publisher.join(30)
    deleter.join(30)
    assert publish_errors == delete_errors == []
    _assert_b_downloadable(db, storage, build_b)
    with db.session() as session:
        assert session.get(BuildRow, build_a) is None


def test_publishing_while_a_deletion_holds_the_blob_stores_a_new_copy(
    db: Database, storage: Storage, two_builds: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    build_a, build_b = two_builds
    # the deletion has set the file aside and not committed yet when the publisher arrives
    aside, go_on = threading.Event(), threading.Event()
    set_aside = Storage.set_blob_aside

    def set_aside_then_wait(self: Storage, sha256: str) -> Path | None:
        moved = set_aside(self, sha256)
        if sha256 == ENGINE_SHA:
            aside.set()
            go_on.wait(10)
        return moved

    monkeypatch.setattr(Storage, "set_blob_aside", set_aside_then_wait)

    def delete_a() -> None:
        with db.session() as session:
            builds.delete_build(session, storage, build_a)

    deleter, delete_errors = _run(delete_a)
    assert aside.wait(10)
    publisher, publish_errors = _run(lambda: _publish(db, storage, build_b))
    time.sleep(0.5)  # the publisher now waits for the blob's lock
    assert publisher.is_alive()
    go_on.set()
    deleter.join(30)
    publisher.join(30)
    assert publish_errors == delete_errors == []
    _assert_b_downloadable(db, storage, build_b)
    assert [p.name for p in storage.iter_blobs_aside()] == []


def test_a_blob_is_deleted_with_its_last_reference_only(
    db: Database, storage: Storage, two_builds: tuple[str, str]
) -> None:
    build_a, build_b = two_builds
    _publish(db, storage, build_b)
    with db.session() as session:
        builds.delete_build(session, storage, build_a)
    assert storage.has_blob(ENGINE_SHA)
    with db.session() as session:
        session.get_one(BuildRow, build_b).status = "succeeded"
        session.commit()
        builds.delete_build(session, storage, build_b)
        assert session.scalars(select(BlobRow.sha256)).all() == []
    assert list(storage.iter_blobs()) == []


def test_a_failed_commit_restores_the_blobs_it_set_aside(
    db: Database, storage: Storage, two_builds: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    build_a, _ = two_builds
    with db.session() as session:
        row = session.get_one(BuildRow, build_a)
        report = row.report_sha256
        session.delete(row)

        def broken_commit() -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(session, "commit", broken_commit)
        with pytest.raises(OSError, match="No space"):
            commit_and_release(session, storage, [ENGINE_SHA, report or ""])
    assert storage.has_blob(ENGINE_SHA)
    assert list(storage.iter_blobs_aside()) == []
    with db.session() as session:
        assert session.get(BuildRow, build_a) is not None


def test_cleanup_restores_a_blob_a_crashed_deletion_set_aside(
    db: Database, storage: Storage, two_builds: tuple[str, str]
) -> None:
    moved = storage.set_blob_aside(ENGINE_SHA)  # then the process died before committing
    assert moved is not None and not storage.has_blob(ENGINE_SHA)
    remove_orphans(db, storage, grace_s=0)
    assert storage.has_blob(ENGINE_SHA)  # build A still references it
    assert list(storage.iter_blobs_aside()) == []


def test_cleanup_deletes_unreferenced_blobs_but_not_one_being_published(
    db: Database, storage: Storage, two_builds: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    build_a, build_b = two_builds
    orphan = storage.put_bytes(b"left by a crash")
    with db.session() as session:  # A's row goes; B publishes the same bytes concurrently
        session.get_one(BuildRow, build_a).artifact_sha256 = None
        session.commit()
    placed, go_on = threading.Event(), threading.Event()
    adopt = Storage.adopt_blob

    def adopt_then_wait(self: Storage, path: Path, sha256: str | None = None) -> BlobRef:
        ref = adopt(self, path, sha256)
        if sha256 == ENGINE_SHA:
            placed.set()
            go_on.wait(10)
        return ref

    monkeypatch.setattr(Storage, "adopt_blob", adopt_then_wait)
    publisher, errors = _run(lambda: _publish(db, storage, build_b))
    assert placed.wait(10)
    cleaner, clean_errors = _run(lambda: remove_orphans(db, storage, grace_s=0) and None)
    time.sleep(0.5)
    go_on.set()
    publisher.join(30)
    cleaner.join(30)
    assert errors == clean_errors == []
    assert not orphan.path.exists()
    _assert_b_downloadable(db, storage, build_b)
