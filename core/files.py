"""Files that are either whole or absent: written beside their destination, flushed, renamed.

Every writer of a table, artifact, sidecar, report or cache goes through here, so no reader ever
sees half a file and a crash leaves at most a hidden ``.<name>.*.tmp`` that the next write ignores.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["flush", "fsync_dir", "temp_file", "write_atomically"]


@contextmanager
def temp_file(folder: Path, name: str) -> Iterator[tuple[Path, BinaryIO]]:
    """A temporary file next to its destination (same file system, so rename is atomic), readable
    by all (0644: artifacts are meant to be read by deploy jobs). Removed on exit unless renamed."""
    fd, raw = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    tmp = Path(raw)
    tmp.chmod(0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield tmp, fh
    finally:
        tmp.unlink(missing_ok=True)


def flush(fh: BinaryIO) -> None:
    """Flush Python's buffer and the kernel's: the bytes are on disk before the rename."""
    fh.flush()
    os.fsync(fh.fileno())


def fsync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes | str) -> None:
    """Write ``data`` (``str`` as UTF-8) to ``path``: temporary file, fsync, rename, fsync folder.
    Raises ``OSError``; callers translate it into their layer's error with a hint."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with temp_file(path.parent, path.name) as (tmp, fh):
        fh.write(payload)
        flush(fh)
        tmp.replace(path)
    fsync_dir(path.parent)
