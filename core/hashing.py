"""Content digests: what cache keys, blob names and artifact sidecars are keyed by."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["sha256_file"]


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in ``chunk_bytes`` chunks (1 MiB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
