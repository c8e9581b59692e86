from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
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


def test_the_layout_is_private_to_the_servers_user(tmp_path: Path) -> None:
    store = Storage(tmp_path / "fresh" / "data")
    store.prepare()
    for folder in (store.root, store.blobs_dir, store.models_dir, store.tmp_root, store.tmp_dir()):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    blob = store.put_bytes(b"secret weights")
    assert stat.S_IMODE(blob.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(blob.path.parent.stat().st_mode) == 0o700
    with store.staging_dir() as staged:
        (staged / "model.onnx").write_bytes(b"x")
        store.publish_dir(staged, store.model_dir("c" * 64))
    assert stat.S_IMODE(store.model_dir("c" * 64).stat().st_mode) == 0o700


def test_an_existing_world_readable_layout_is_narrowed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "blobs").mkdir(parents=True)
    root.chmod(0o755)
    (root / "blobs").chmod(0o775)
    Storage(root).prepare()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "blobs").stat().st_mode) == 0o700


_FULL_DISK_SCRIPT = """
import json, resource, signal, sys
from pathlib import Path
from service.errors import InsufficientStorageError
from service.store.storage import Storage

store = Storage(Path(sys.argv[1]))
store.prepare()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
results = {}
try:
    with store.pending() as pending:
        for _ in range(3):
            pending.write(b"x" * (1 << 20))
        pending.commit()
except InsufficientStorageError as exc:
    results["upload"] = [exc.code, exc.message]
try:
    store.put_bytes(b"y" * (2 << 20))
except InsufficientStorageError as exc:
    results["blob"] = [exc.code, exc.message]
print(json.dumps(results))
"""


def test_a_full_disk_is_insufficient_storage_and_leaves_nothing(tmp_path: Path) -> None:
    # a file-size limit makes writes past 1 MiB fail the way a full disk does
    data = tmp_path / "data"
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(data)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert child.returncode == 0, child.stderr
    results = json.loads(child.stdout)
    for what in ("upload", "blob"):
        code, message = results[what]
        assert code == "insufficient_storage"
        assert "full" in message and str(data) not in message
    leftovers = [p for p in data.rglob("*") if p.is_file()]
    assert leftovers == []


def test_disk_full_is_recognised_through_the_errors_raised_from_it() -> None:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from calibrators.errors import ArchiveError
    from service.store.storage import is_disk_full, storage_error

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise ArchiveError("model.zip cannot be extracted") from exc
    except ArchiveError as wrapped:
        assert is_disk_full(wrapped)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert is_disk_full(OperationalError("INSERT", {}, full))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("nope"))
    error = storage_error(OSError(errno.EACCES, "Permission denied", "/srv/data/x"), "Cannot x")
    assert (error.code, error.message) == ("storage_failed", "Cannot x: Permission denied.")


_FULL_DISK_API_SCRIPT = """
import json, resource, signal, sys
from pathlib import Path
from fastapi.testclient import TestClient
from service.api.app import create_app
from service.db import Database
from tests.unit.service.support import make_settings, zip_bytes

folder = Path(sys.argv[1])
url = f"sqlite:///{folder / 'trtforge-test.db'}"
Database(url).migrate()
out = {}
with TestClient(create_app(make_settings(folder / "data", url))) as client:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    big = client.post("/v1/models", files={"file": ("big.onnx", b"x" * (3 << 20))})
    # a small upload whose extraction outgrows the disk
    packed = zip_bytes({"model.onnx": b"\\0" * (3 << 20)})
    unpacked = client.post("/v1/models", files={"file": ("m.zip", packed)})
    out = {
        "big": [big.status_code, big.json()],
        "zip": [unpacked.status_code, unpacked.json()],
        "healthz": client.get("/healthz").status_code,
        "models": client.get("/v1/models").json()["total"],
    }
print(json.dumps(out))
"""


def test_uploads_onto_a_full_disk_answer_507_and_leave_nothing(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_API_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    for what in ("big", "zip"):
        status, body = out[what]
        assert status == 507, body
        assert body["error"]["code"] == "insufficient_storage"
        assert body["error"]["hint"] and str(tmp_path) not in body["error"]["message"]
    assert (out["healthz"], out["models"]) == (200, 0)
    data = tmp_path / "data"
    for folder in ("tmp", "blobs", "models", "datasets"):
        assert [p for p in (data / folder).rglob("*") if p.is_file()] == [], folder
