"""Opening untrusted zip archives safely.

Everything is decided from the central directory before a byte is extracted: member paths
(absolute, drive letters, ``..`` in either slash direction, NUL bytes), duplicates, symlinks,
encryption, the member count and the declared uncompressed sizes (:class:`ArchiveLimits`).
Extraction then counts the bytes it really gets, so a member whose headers lie is refused too.

Members are read lazily (:func:`open_member`): a stored member is a window onto the archive file,
a small deflated one is read into memory, a large deflated one is streamed (seeking back restarts
its decompression), so a zip holding a large shard never costs the shard's size in memory.
"""

from __future__ import annotations

import io
import re
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from calibrators.errors import ArchiveError

__all__ = [
    "BUFFERED_MEMBER_BYTES",
    "ZIP_READ_ERRORS",
    "ArchiveLimits",
    "file_members",
    "member_is_streamed",
    "open_member",
    "open_zip",
    "read_member",
    "stored_data_offset",
]

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

BUFFERED_MEMBER_BYTES = 64 << 20
"""Deflated members up to this size are read into memory by :func:`open_member`; larger ones
are streamed."""

_SEEK_CHUNK = 1 << 20
_WINDOW_BUFFER = 64 << 10

_UNSAFE_NAME = re.compile(r"^[\\/]|^[A-Za-z]:|(^|[\\/])\.\.([\\/]|$)|\x00")


class ArchiveLimits(BaseModel):
    """Bounds checked against a zip's central directory before anything is extracted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_members: int = Field(default=100_000, gt=0)
    max_total_bytes: int = Field(default=8 * _GiB, gt=0)
    max_member_bytes: int = Field(default=2 * _GiB, gt=0)
    max_preprocessed_pixels: int = Field(default=4096 * 4096, gt=0)
    """Pixels of one image after resizing and cropping (:mod:`calibrators.images`): bounds the
    memory a small image scaled up by ``resize_shorter`` takes."""


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


def stored_data_offset(raw: IO[bytes], info: zipfile.ZipInfo, label: str) -> int:
    """Absolute offset of a stored member's data in ``raw``: after its local header, name and
    extra field. :class:`ArchiveError` when the stored extent is not what the headers claim."""
    raw_size = raw.seek(0, io.SEEK_END)
    raw.seek(info.header_offset)
    local = raw.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise ArchiveError(f"{label} has a corrupt local header.", hint="Upload the file again.")
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    # rows are read straight from the file, so the stored extent must be what it claims
    if info.compress_size != info.file_size or start + info.file_size > raw_size:
        raise ArchiveError(f"{label} is truncated or its sizes are inconsistent.")
    return start


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of a file as a seekable, read-only stream."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._start, self._size, self._pos = start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._size - self._pos)
        if count <= 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:count])
        self._pos += got
        return got

    def close(self) -> None:
        self._file.close()
        super().close()


def member_is_streamed(info: zipfile.ZipInfo) -> bool:
    """Whether :func:`open_member` streams ``info``: seeking such a stream backwards decompresses
    again from the start, so open one stream per position that moves forward."""
    return info.compress_type != zipfile.ZIP_STORED and info.file_size > BUFFERED_MEMBER_BYTES


def open_member(path: Path, member: str, label: str, limits: ArchiveLimits) -> IO[bytes]:
    """A seekable stream of ``member`` of the zip ``path``; close it when done.

    Stored members are read in place (a window onto ``path``); deflated members up to
    :data:`BUFFERED_MEMBER_BYTES` are read into memory; larger ones are streamed
    (:func:`member_is_streamed`).
    """
    with open_zip(path, label, limits) as archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise ArchiveError(f"{label} is no longer in {path.name}.") from None
        if info.compress_type == zipfile.ZIP_STORED:
            with path.open("rb") as raw:
                start = stored_data_offset(raw, info, label)
            return io.BufferedReader(_Window(path, start, info.file_size), _WINDOW_BUFFER)
        if not member_is_streamed(info):
            return io.BytesIO(read_member(archive, info, label))
        try:
            # the stream keeps the archive's file open after the archive object is closed
            stream = archive.open(info)
        except ZIP_READ_ERRORS as exc:
            raise ArchiveError(f"{label} cannot be extracted: {exc}.") from exc
        if isinstance(stream, zipfile.ZipExtFile):  # seeks decompress in chunks of this size
            stream.MAX_SEEK_READ = _SEEK_CHUNK
        return stream
