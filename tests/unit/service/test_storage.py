from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import PayloadTooLargeError, StorageError
from service.store.storage import Storage
from service.worker.processes import process_alive, process_tag


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    store = Storage(tmp_path / "data")
    store.prepare()
    return store


def _tmp_files(store: Storage) -> list[Path]:
    return [p for p in store.tmp_root.rglob("*") if p.is_file()]


def test_pending_file_hashes_while_writing_and_commits_content_addressed(storage: Storage) -> None:
    data = os.urandom(3 << 20)
    with storage.pending(max_bytes=len(data)) as pending:
        for i in range(0, len(data), 100_000):
            pending.write(data[i : i + 100_000])
        ref = pending.commit()
    sha = hashlib.sha256(data).hexdigest()
    assert (ref.sha256, ref.size_bytes) == (sha, len(data))
    assert ref.path == storage.blobs_dir / sha[:2] / sha
    assert ref.path.read_bytes() == data
    assert _tmp_files(storage) == []


def test_same_bytes_twice_give_one_blob(storage: Storage) -> None:
    first = storage.put_bytes(b"hello")
    second = storage.put_bytes(b"hello")
    assert first == second
    assert len(list(storage.iter_blobs())) == 1
    assert _tmp_files(storage) == []


def test_oversized_upload_is_refused_and_leaves_nothing(storage: Storage) -> None:
    with (
        pytest.raises(PayloadTooLargeError, match="limit of 10 bytes"),
        storage.pending(max_bytes=10) as pending,
    ):
        pending.write(b"123456")
        pending.write(b"7890ab")
    assert _tmp_files(storage) == []
    assert list(storage.iter_blobs()) == []


def test_discarded_pending_file_is_removed(storage: Storage) -> None:
    with storage.pending() as pending:
        pending.write(b"partial")
        path = pending.path
        assert path.exists()
    assert not path.exists()


def test_taken_file_is_handed_over(storage: Storage, tmp_path: Path) -> None:
    with storage.pending() as pending:
        pending.write(b"abc")
        taken = pending.take()
        assert pending.sha256 == hashlib.sha256(b"abc").hexdigest()
    assert taken.read_bytes() == b"abc"


def test_publish_dir_is_atomic_and_first_writer_wins(storage: Storage) -> None:
    dest = storage.model_dir("a" * 64)
    for content in (b"first", b"second"):
        with storage.staging_dir() as staged:
            (staged / "model.onnx").write_bytes(content)
            storage.publish_dir(staged, dest)
    assert (dest / "model.onnx").read_bytes() == b"first"
    assert _tmp_files(storage) == []
    storage.remove_entry(dest)
    assert not dest.exists()


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", "x" * 200])
def test_entry_ids_cannot_escape(storage: Storage, bad: str) -> None:
    with pytest.raises(StorageError):
        storage.model_dir(bad)


def test_blob_paths_need_a_sha256(storage: Storage) -> None:
    with pytest.raises(StorageError):
        storage.blob_path("../../secret")


def test_temp_folders_of_dead_processes_are_removed(storage: Storage) -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(child.stdout)
    dead = storage.tmp_root / f"p{dead_pid}-12345"
    dead.mkdir()
    (dead / "upload-x").write_bytes(b"partial upload")
    mine = storage.tmp_dir()
    (mine / "keep").write_bytes(b"in use")
    removed = storage.remove_stale_tmp()
    assert removed == [dead]
    assert (mine / "keep").exists()


def test_process_tags_tell_live_from_dead() -> None:
    assert process_alive(process_tag())
    assert not process_alive(f"p{os.getpid()}-1")  # same pid, another start time
    assert not process_alive("garbage")


def test_check_reports_a_writable_directory(storage: Storage) -> None:
    storage.check()
    assert _tmp_files(storage) == []
