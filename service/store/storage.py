"""Files under the data directory, written so that a partial file is never visible.

::

    <data_dir>/
      blobs/<aa>/<sha256>          content-addressed files: artifacts, reports, tables
      models/<sha256>/             one uploaded model: model.onnx (+ its external data files)
      datasets/<id>/               one uploaded dataset: dataset.<npz|zip> (+ preprocess.json)
      work/<build id>/             a running build's scratch space, removed when it ends
      tmp/p<pid>-<start>/          this process's temporary files
      pins/p<pid>-<start>/, cache.lock   a remote worker's input cache (service.worker.input_cache)

Every file is written in ``tmp/`` (same file system), flushed with ``fsync`` and renamed into
place; a directory entry (model, dataset) is assembled in ``tmp/`` and renamed as a whole. A
process's ``tmp/`` folder is removed at startup once that process is gone, so a crash leaves
nothing behind that a reader could see. Folders are created ``0700`` and received files ``0600``:
only the server's user reads them (the API serves what others may download).

Which blobs may be deleted is decided in the database (:mod:`service.store.blobs`): this module
only moves files. A full disk raises :class:`InsufficientStorageError` (HTTP 507) and leaves no
partial file; no error message names a server path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from core.files import fsync_dir
from core.hashing import sha256_file
from service.errors import InsufficientStorageError, PayloadTooLargeError, StorageError
from service.worker.processes import process_alive, process_tag

__all__ = ["BlobRef", "PendingFile", "Storage", "is_disk_full", "storage_error"]

_CHUNK_BYTES = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_RE = re.compile(r"^[0-9A-Za-z_-]{1,128}$")
_ASIDE_MARK = ".deleting-"
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) says the disk or a quota is full: an
    ``OSError`` (ENOSPC, EDQUOT, EFBIG), SQLite's SQLITE_FULL or PostgreSQL's disk_full."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(current, InsufficientStorageError):
            return True
        if getattr(current, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if getattr(current, "sqlstate", None) == _PG_DISK_FULL:
            return True
        driver_error = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps it
        if isinstance(driver_error, BaseException) and is_disk_full(driver_error):
            return True
        current = current.__cause__ or current.__context__
    return False


def storage_error(exc: OSError, doing: str) -> StorageError:
    """``exc`` as the service's error: :class:`InsufficientStorageError` for a full disk; the
    message names what failed but no server path."""
    if is_disk_full(exc):
        return InsufficientStorageError(f"{doing}: the server's data directory is full.")
    reason = exc.strerror or type(exc).__name__
    return StorageError(f"{doing}: {reason}.")


def _mkdir_private(folder: Path) -> None:
    """``mkdir -p`` whose last folder is created ``0700``."""
    folder.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)


@dataclass(frozen=True)
class BlobRef:
    """A stored blob."""

    sha256: str
    size_bytes: int
    path: Path


class PendingFile:
    """A file being received: hashed and size-checked as it is written, invisible until kept.

    Use in a ``with`` block; unless :meth:`commit` or :meth:`take` is called, the file is deleted.
    """

    def __init__(self, path: Path, max_bytes: int | None, store: Storage) -> None:
        self.path = path
        self._max = max_bytes
        self._store = store
        self._digest = hashlib.sha256()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        except OSError as exc:
            raise storage_error(exc, "Cannot receive the upload") from exc
        self._fh: BinaryIO | None = os.fdopen(fd, "wb")
        self.size_bytes = 0
        self._sha256: str | None = None
        self._taken = False

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``; raises :class:`PayloadTooLargeError` past the size limit."""
        if self._fh is None:
            raise StorageError("The upload was already finished.")
        self.size_bytes += len(chunk)
        if self._max is not None and self.size_bytes > self._max:
            raise PayloadTooLargeError(
                f"The upload exceeds the server's limit of {self._max} bytes.", field="file"
            )
        self._digest.update(chunk)
        try:
            self._fh.write(chunk)
        except OSError as exc:
            raise storage_error(exc, "Cannot store the upload") from exc

    def finish(self) -> str:
        """Flush to disk and return the sha256; the file can then be read at :attr:`path`."""
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as exc:
                raise storage_error(exc, "Cannot store the upload") from exc
            self._fh.close()
            self._fh = None
            self._sha256 = self._digest.hexdigest()
        assert self._sha256 is not None
        return self._sha256

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            raise StorageError("The upload is not finished yet.")
        return self._sha256

    def commit(self) -> BlobRef:
        """Publish as a content-addressed blob (a no-op copy when that blob exists)."""
        sha = self.finish()
        ref = self._store.adopt_blob(self.path, sha)
        self._taken = True
        return ref

    def take(self) -> Path:
        """Finish and hand the file over to the caller (who renames or removes it)."""
        self.finish()
        self._taken = True
        return self.path

    def discard(self) -> None:
        """Close and delete the file (unless it was handed over with :meth:`take`)."""
        if self._fh is not None:
            with contextlib.suppress(OSError):  # a full disk fails the flush in close()
                self._fh.close()
            self._fh = None
        if not self._taken:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> PendingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


class Storage:
    """The data directory (see the module docstring for its layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.models_dir = self.root / "models"
        self.datasets_dir = self.root / "datasets"
        self.work_root = self.root / "work"
        self.tmp_root = self.root / "tmp"
        self._tmp: Path | None = None
        self._tmp_pid = 0

    # -- setup and health --------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the layout, private to this user (``0700``; the root and its folders are
        narrowed to that when found wider); raises :class:`StorageError` when it is unusable."""
        try:
            for folder in (
                self.root,
                self.blobs_dir,
                self.models_dir,
                self.datasets_dir,
                self.work_root,
                self.tmp_root,
            ):
                _mkdir_private(folder)
                info = folder.stat()
                if info.st_uid == os.getuid() and info.st_mode & 0o077:
                    folder.chmod(_DIR_MODE)
        except OSError as exc:
            raise StorageError(
                f"Cannot create the data directory {str(self.root)!r}: {exc}"
            ) from exc

    def check(self) -> None:
        """Write, read back and remove a probe file (readiness check)."""
        try:
            probe = self.tmp_dir() / f"probe-{uuid.uuid4().hex}"
            try:
                probe.write_bytes(b"ok")
                ok = probe.read_bytes() == b"ok"
            finally:
                probe.unlink(missing_ok=True)
        except OSError as exc:
            raise storage_error(exc, "The data directory is not writable") from exc
        if not ok:
            raise StorageError("The data directory returned different bytes than written.")

    def tmp_dir(self) -> Path:
        """This process's temporary folder (created on first use)."""
        pid = os.getpid()
        if self._tmp is None or self._tmp_pid != pid:  # a forked child gets its own folder
            self._tmp, self._tmp_pid = self.tmp_root / process_tag(pid), pid
        try:
            _mkdir_private(self._tmp)
        except OSError as exc:
            raise storage_error(exc, "Cannot create a temporary folder") from exc
        return self._tmp

    def remove_own_tmp(self) -> None:
        """Remove this process's temporary folder (at shutdown)."""
        if self._tmp is not None and self._tmp_pid == os.getpid():
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def remove_stale_tmp(self) -> list[Path]:
        """Remove the temporary folders of processes that are gone; return what was removed."""
        removed: list[Path] = []
        if not self.tmp_root.is_dir():
            return removed
        for entry in self.tmp_root.iterdir():
            if entry.is_dir() and not process_alive(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    # -- receiving ---------------------------------------------------------------------------

    def pending(self, *, max_bytes: int | None = None, suffix: str = "") -> PendingFile:
        """A new temporary file that hashes and size-checks what is written to it."""
        path = self.tmp_dir() / f"upload-{uuid.uuid4().hex}{suffix}"
        return PendingFile(path, max_bytes, self)

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """A temporary folder for assembling an entry; removed on exit unless renamed away."""
        try:
            folder = Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp_dir()))
        except OSError as exc:
            raise storage_error(exc, "Cannot create a staging folder") from exc
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- blobs -------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        if not _SHA256_RE.match(sha256):
            raise StorageError(f"{sha256!r} is not a sha256 hex digest.")
        return self.blobs_dir / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def hash_file(self, path: Path) -> str:
        """The sha256 of a file (one being published)."""
        try:
            return sha256_file(path)
        except OSError as exc:
            raise storage_error(exc, "Cannot read a file to store") from exc

    def adopt_blob(self, path: Path, sha256: str | None = None) -> BlobRef:
        """Move ``path`` (on this file system) into the blob store; hashed unless given.

        Only moves the file: a caller that links a row to the blob goes through
        :func:`service.store.blobs.place_blob`, which holds the blob's lock meanwhile.
        """
        sha = sha256 or self.hash_file(path)
        dest = self.blob_path(sha)
        try:
            size = path.stat().st_size
            if dest.is_file():
                path.unlink()
            else:
                _mkdir_private(dest.parent)
                with path.open("rb+") as fh:
                    os.fsync(fh.fileno())
                path.chmod(_FILE_MODE)
                path.replace(dest)
                fsync_dir(dest.parent)
        except OSError as exc:
            raise storage_error(exc, f"Cannot store blob {sha[:12]}") from exc
        return BlobRef(sha256=sha, size_bytes=size, path=dest)

    def put_bytes(self, data: bytes) -> BlobRef:
        """Store ``data`` as a blob."""
        with self.pending() as pending:
            pending.write(data)
            return pending.commit()

    def put_file(self, source: Path) -> BlobRef:
        """Copy ``source`` into the blob store (the source is left alone)."""
        with self.pending() as pending, source.open("rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                pending.write(chunk)
            return pending.commit()

    def set_blob_aside(self, sha256: str) -> Path | None:
        """Rename a blob being deleted to ``.<sha>.deleting-<id>`` beside it (so a failed commit
        can restore it); None when it is not there."""
        dest = self.blob_path(sha256)
        aside = dest.with_name(f".{sha256}{_ASIDE_MARK}{uuid.uuid4().hex}")
        try:
            dest.rename(aside)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise storage_error(exc, f"Cannot delete blob {sha256[:12]}") from exc
        return aside

    def restore_blob(self, aside: Path, sha256: str) -> None:
        """Undo :meth:`set_blob_aside` (a no-op when the blob was stored again meanwhile)."""
        dest = self.blob_path(sha256)
        with contextlib.suppress(OSError):
            if dest.is_file():
                aside.unlink(missing_ok=True)
            else:
                aside.rename(dest)

    def iter_blobs(self) -> Iterable[Path]:
        """Every stored blob file (not those set aside)."""
        if self.blobs_dir.is_dir():
            yield from (
                p for p in self.blobs_dir.glob("*/*") if _SHA256_RE.match(p.name) and p.is_file()
            )

    def iter_blobs_aside(self) -> Iterable[tuple[Path, str]]:
        """Blobs set aside by a deletion that has not finished: (file, sha256)."""
        if self.blobs_dir.is_dir():
            for path in self.blobs_dir.glob(f"*/.*{_ASIDE_MARK}*"):
                sha = path.name[1:].partition(_ASIDE_MARK)[0]
                if _SHA256_RE.match(sha):
                    yield path, sha

    # -- directory entries (models, datasets) and work dirs ----------------------------------

    def model_dir(self, model_id: str) -> Path:
        return self.models_dir / _entry(model_id)

    def dataset_dir(self, dataset_id: str) -> Path:
        return self.datasets_dir / _entry(dataset_id)

    def work_dir(self, build_id: str) -> Path:
        return self.work_root / _entry(build_id)

    def publish_dir(self, staged: Path, dest: Path) -> bool:
        """Rename the assembled folder ``staged`` to ``dest``; False when ``dest`` exists already."""
        try:
            for file in staged.rglob("*"):
                if file.is_file():
                    with file.open("rb+") as fh:
                        os.fsync(fh.fileno())
            _mkdir_private(dest.parent)
            staged.chmod(_DIR_MODE)
        except OSError as exc:
            raise storage_error(exc, f"Cannot store {dest.name[:12]}") from exc
        try:
            staged.rename(dest)
        except OSError as exc:
            if dest.is_dir():
                return False
            raise storage_error(exc, f"Cannot store {dest.name[:12]}") from exc
        fsync_dir(dest.parent)
        return True

    def remove_entry(self, folder: Path) -> None:
        """Remove a published folder: renamed into tmp first, so it vanishes in one step."""
        if not folder.exists():
            return
        doomed = self.tmp_dir() / f"doomed-{uuid.uuid4().hex}"
        try:
            folder.rename(doomed)
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            return
        shutil.rmtree(doomed, ignore_errors=True)

    def entries_older_than(self, folder: Path, seconds: float) -> list[Path]:
        """Sub-folders of ``folder`` last modified more than ``seconds`` ago."""
        if not folder.is_dir():
            return []
        limit = time.time() - seconds
        return [p for p in folder.iterdir() if p.stat().st_mtime < limit]


def _entry(name: str) -> str:
    if not _ENTRY_RE.match(name):
        raise StorageError(f"{name!r} is not a valid storage id.")
    return name
