"""Opening untrusted zip archives safely.

Everything is decided from the central directory before a byte is extracted: member paths
(absolute, drive letters, ``..`` in either slash direction, NUL bytes), duplicates, symlinks,
encryption, the member count and the declared uncompressed sizes (:class:`ArchiveLimits`).
Extraction then counts the bytes it really gets, so a member whose headers lie is refused too.
"""

from __future__ import annotations

import re
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field

from calibrators.errors import ArchiveError

__all__ = ["ZIP_READ_ERRORS", "ArchiveLimits", "file_members", "open_zip", "read_member"]

_GiB = 1 << 30

ZIP_READ_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    struct.error,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
)
"""What :mod:`zipfile` raises for corrupt, truncated or unsupported archives."""

_UNSAFE_NAME = re.compile(r"^[\\/]|^[A-Za-z]:|(^|[\\/])\.\.([\\/]|$)|\x00")


class ArchiveLimits(BaseModel):
    """Bounds checked against a zip's central directory before anything is extracted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_members: int = Field(default=100_000, gt=0)
    max_total_bytes: int = Field(default=8 * _GiB, gt=0)
    max_member_bytes: int = Field(default=2 * _GiB, gt=0)


def open_zip(source: Path | IO[bytes], label: str, limits: ArchiveLimits) -> zipfile.ZipFile:
    """Open ``source`` as a zip after checking every member; ``label`` names it in errors.

    Raises :class:`ArchiveError` for unreadable or unsafe archives. Closing the returned
    archive does not close a file object passed in.
    """
    try:
        archive = zipfile.ZipFile(source)
    except ZIP_READ_ERRORS as exc:
        raise ArchiveError(
            f"{label} is not a readable zip archive: {exc}.",
            hint="The upload may be truncated; re-create the file with np.savez or `zip`.",
        ) from exc
    try:
        _check_members(archive.infolist(), label, limits)
    except ArchiveError:
        archive.close()
        raise
    return archive


def _check_members(infos: list[zipfile.ZipInfo], label: str, limits: ArchiveLimits) -> None:
    if len(infos) > limits.max_members:
        raise ArchiveError(
            f"{label} has {len(infos):,} members, more than the limit of {limits.max_members:,}.",
            hint="Pack fewer, larger shards.",
        )
    total, seen = 0, set()
    for info in infos:
        if _UNSAFE_NAME.search(info.orig_filename) or info.filename in seen:
            raise ArchiveError(
                f"{label} member {info.orig_filename!r} has an unsafe or duplicate path "
                "(absolute, drive letter or '..').",
            )
        seen.add(info.filename)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(f"{label} member {info.filename!r} is a symbolic link.")
        if info.flag_bits & 0x1:
            raise ArchiveError(
                f"{label} member {info.filename!r} is encrypted.",
                hint="Pack it without a password.",
            )
        total += info.file_size
        if info.file_size > limits.max_member_bytes or total > limits.max_total_bytes:
            raise ArchiveError(
                f"{label} expands to more than the allowed size (member {info.filename!r}: "
                f"{info.file_size:,} bytes; limits {limits.max_member_bytes:,} per member, "
                f"{limits.max_total_bytes:,} in all).",
                hint="Split the dataset into smaller archives or calibrate on fewer samples.",
            )


def file_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """File members in sorted name order, without folders, hidden files and ``__MACOSX/``."""
    infos = [
        info
        for info in archive.infolist()
        if not info.is_dir()
        and not info.filename.startswith("__MACOSX/")
        and not info.filename.rsplit("/", 1)[-1].startswith(".")
    ]
    return sorted(infos, key=lambda info: info.filename)


def read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str) -> bytes:
    """A member's bytes; :class:`ArchiveError` if it is corrupt or not the size declared."""
    try:
        with archive.open(info) as member:
            data = member.read(info.file_size + 1)
    except ZIP_READ_ERRORS as exc:
        raise ArchiveError(f"{label} cannot be extracted: {exc}.") from exc
    if len(data) != info.file_size:  # count what was really read: headers can lie
        raise ArchiveError(
            f"{label} holds {len(data):,} bytes, not the {info.file_size:,} declared."
        )
    return data
