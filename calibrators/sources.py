"""Where calibration samples come from; the lazy readers behind :mod:`calibrators.data`.

A source knows its layout (input name -> dtype and per-sample shape) and sample count from
headers alone. Its reader returns sample rows ``[start, stop)`` on demand:

- ``.npy`` arrays (plain files or ``.npz`` members) are parsed with numpy's header readers and
  rows are read at their byte offsets: seeking in files and stored zip members, streaming
  forward through deflated members (reopened when a read goes backwards);
- shards are opened one at a time, and a shard inside a zip is never read whole: a stored one is
  read in place, a deflated one streamed (one stream per array, so each only moves forward);
- images are decoded and preprocessed per read.

Nothing is ever unpickled: object and other non-numeric dtypes are refused from the header.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import numpy.typing as npt

from calibrators.archive import (
    ZIP_READ_ERRORS,
    ArchiveLimits,
    file_members,
    member_is_streamed,
    open_member,
    open_zip,
    read_member,
    stored_data_offset,
)
from calibrators.errors import ArchiveError, DatasetError
from calibrators.images import MAX_IMAGE_FILE_BYTES, check_preprocess_size, decode_image
from calibrators.spec import PreprocessSpec

__all__ = [
    "LAYOUT_HINT",
    "PICKLE_HINT",
    "ArraysSource",
    "ImageSource",
    "Layout",
    "MemorySource",
    "Reader",
    "ShardSource",
    "Source",
    "concat",
    "npy_container",
    "npz_container",
    "zip_shards",
]

Array = npt.NDArray[Any]
Layout = dict[str, tuple[np.dtype[Any], tuple[int, ...]]]
"""Input name -> (dtype, per-sample shape)."""

PICKLE_HINT = "pickled or object arrays are not accepted; save plain numeric arrays with np.savez"
LAYOUT_HINT = (
    "Save one array per model input with samples on the first axis: np.savez(path, **arrays)."
)
_CHUNK = 1 << 20


class Reader(Protocol):
    """Reads sample rows of every input; close it when done."""

    def read(self, start: int, stop: int) -> dict[str, Array]: ...

    def close(self) -> None: ...


class Source(Protocol):
    """Layout and sample count, known without reading samples; :meth:`reader` reads them."""

    layout: Layout
    num_samples: int

    def reader(self) -> Reader: ...


def concat(parts: list[dict[str, Array]]) -> dict[str, Array]:
    """Concatenate row blocks read from one source."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _common_count(counts: Mapping[str, int], label: str) -> int:
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name!r}: {count}" for name, count in sorted(counts.items()))
        raise DatasetError(
            f"{label}: inputs have different sample counts ({listed}).",
            hint="Every input needs one entry per sample along the first axis.",
        )
    return next(iter(counts.values()), 0)


# --- .npy arrays, row by row ---------------------------------------------------------------------


@dataclass(frozen=True)
class _NpyArray:
    label: str  # names the array in messages, e.g. "calib.npz:image"
    member: str | None  # zip member holding the .npy; None: the container is the .npy
    offset: int | None  # absolute offset of the first data byte when rows can be seeked to
    data_start: int  # offset of the first data byte within the .npy
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])


def _parse_npy_header(
    stream: IO[bytes], label: str, size: int
) -> tuple[np.dtype[Any], tuple[int, ...], int]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"unsupported .npy format version {version}")
        header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = header(stream)
        data_start = stream.tell()
    except (*ZIP_READ_ERRORS, SyntaxError) as exc:
        raise DatasetError(
            f"{label} is not a readable .npy array: {exc}.", hint=LAYOUT_HINT
        ) from exc
    if dtype.hasobject:
        raise DatasetError(f"{label}: {PICKLE_HINT}.", hint=LAYOUT_HINT)
    if dtype.kind not in "biuf":
        raise DatasetError(
            f"{label} has dtype {dtype}; only bool, int and float arrays are accepted."
        )
    if fortran_order and len(shape) > 1:
        raise DatasetError(
            f"{label} is stored in Fortran order.", hint="Save np.ascontiguousarray(array) instead."
        )
    if not shape:
        raise DatasetError(
            f"{label} is a scalar; it needs a leading sample axis.", hint=LAYOUT_HINT
        )
    if data_start + dtype.itemsize * math.prod(shape) != size:
        raise DatasetError(
            f"{label} holds {size:,} bytes, which does not match its header (shape {shape}, "
            f"{dtype}): the file is truncated or corrupt.",
            hint="Upload the file again.",
        )
    return dtype, tuple(shape), data_start


def _scan_npz(archive: zipfile.ZipFile, raw: IO[bytes], label: str) -> dict[str, _NpyArray]:
    arrays: dict[str, _NpyArray] = {}
    for info in file_members(archive):
        if not info.filename.lower().endswith(".npy"):
            raise DatasetError(
                f"{label} member {info.filename!r} is not a .npy array.", hint=LAYOUT_HINT
            )
        key = info.filename[:-4]
        where = f"{label}:{key}"
        try:
            with archive.open(info) as stream:
                dtype, shape, data_start = _parse_npy_header(stream, where, info.file_size)
        except ZIP_READ_ERRORS as exc:
            raise ArchiveError(f"{where} cannot be extracted: {exc}.") from exc
        offset = None
        if info.compress_type == zipfile.ZIP_STORED:
            offset = stored_data_offset(raw, info, where) + data_start
        arrays[key] = _NpyArray(where, info.filename, offset, data_start, dtype, shape)
    return arrays


def _read_exact(stream: IO[bytes], count: int, label: str) -> bytearray:
    # Chunked: ZipExtFile.read(n) would build n bytes by repeated concatenation (several copies).
    buffer = bytearray(count)
    view, got = memoryview(buffer), 0
    while got < count:
        chunk = stream.read(min(count - got, _CHUNK))
        if not chunk:
            raise DatasetError(
                f"{label} ends early: the file is truncated.", hint="Upload it again."
            )
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return buffer


@dataclass(frozen=True)
class Container:
    """One file holding arrays (a plain .npy or a .npz); ``opener`` gives a fresh binary stream.

    ``sequential``: the streams seek backwards slowly (a large deflated zip member), so a reader
    opens one per array and each only moves forward.
    """

    opener: Callable[[], IO[bytes]]
    arrays: dict[str, _NpyArray]
    sequential: bool = False


class _ContainerReader:
    def __init__(self, container: Container) -> None:
        self._container = container
        self._raws: dict[str | None, IO[bytes]] = {}  # per array when sequential, else one
        self._archives: dict[str | None, zipfile.ZipFile] = {}
        self._streams: dict[str, tuple[IO[bytes], int]] = {}

    def _key(self, name: str) -> str | None:
        return name if self._container.sequential else None

    def _raw(self, name: str) -> IO[bytes]:
        key = self._key(name)
        if key not in self._raws:
            self._raws[key] = self._container.opener()
        return self._raws[key]

    def read(self, start: int, stop: int) -> dict[str, Array]:
        arrays = self._container.arrays
        return {name: self._rows(name, array, start, stop) for name, array in arrays.items()}

    def _rows(self, name: str, array: _NpyArray, start: int, stop: int) -> Array:
        count = (stop - start) * array.row_bytes
        try:
            if array.offset is not None:
                raw = self._raw(name)
                raw.seek(array.offset + start * array.row_bytes)
                data = _read_exact(raw, count, array.label)
            else:
                data = self._stream(name, array, array.data_start + start * array.row_bytes, count)
        except ZIP_READ_ERRORS as exc:
            raise DatasetError(
                f"{array.label} cannot be read: {exc}.", hint="Upload it again."
            ) from exc
        rows = np.frombuffer(data, dtype=array.dtype).reshape((stop - start, *array.shape[1:]))
        if array.dtype.isnative:
            return rows
        return rows.byteswap().view(array.dtype.newbyteorder("="))

    def _stream(self, name: str, array: _NpyArray, position: int, count: int) -> bytearray:
        stream, at = self._streams.pop(name, (None, 0))
        if stream is None or at > position:  # a deflate stream cannot seek back: reopen it
            if stream is not None:
                stream.close()
            key = self._key(name)
            if key not in self._archives:
                self._archives[key] = zipfile.ZipFile(self._raw(name))
            stream, at = self._archives[key].open(array.member or ""), 0
        while at < position:
            skipped = len(stream.read(min(position - at, _CHUNK)))
            if not skipped:
                raise DatasetError(f"{array.label} ends early: the file is truncated.")
            at += skipped
        data = _read_exact(stream, count, array.label)
        self._streams[name] = (stream, position + count)
        return data

    def close(self) -> None:
        for stream, _ in self._streams.values():
            stream.close()
        for archive in self._archives.values():
            archive.close()
        for raw in self._raws.values():
            raw.close()


def _file_opener(path: Path) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        return path.open("rb")

    return opener


def npz_container(path: Path, limits: ArchiveLimits) -> Container:
    """A ``.npz`` (or zip of ``.npy``) file on disk; only headers are read."""
    return _npz_container(_file_opener(path), path.name, limits)


def _npz_container(opener: Callable[[], IO[bytes]], label: str, limits: ArchiveLimits) -> Container:
    with opener() as raw, open_zip(raw, label, limits) as archive:
        return Container(opener, _scan_npz(archive, raw, label))


def npy_container(path: Path, name: str) -> Container:
    """A plain ``.npy`` file holding input ``name``; only its header is read."""
    with path.open("rb") as raw:
        dtype, shape, start = _parse_npy_header(raw, path.name, path.stat().st_size)
    return Container(
        _file_opener(path), {name: _NpyArray(path.name, None, start, start, dtype, shape)}
    )


def zip_shards(path: Path, limits: ArchiveLimits) -> list[tuple[str, Container]]:
    """The ``.npz`` shards inside the zip ``path`` as (member, container), in member order.

    No shard is read whole (:func:`calibrators.archive.open_member`): its headers are scanned
    from a stream, and its rows are later read from streams of the member the same way.
    """
    shards = []
    with open_zip(path, path.name, limits) as outer:
        members = file_members(outer)
    for info in members:
        label = f"{path.name}:{info.filename}"
        opener = _member_opener(path, info.filename, label, limits)
        with opener() as raw, open_zip(raw, label, limits) as inner:
            arrays = _scan_npz(inner, raw, label)
        shards.append((info.filename, Container(opener, arrays, member_is_streamed(info))))
    return shards


def _member_opener(
    path: Path, member: str, label: str, limits: ArchiveLimits
) -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        return open_member(path, member, label, limits)

    return opener


# --- sources -------------------------------------------------------------------------------------


class MemorySource:
    """Arrays already in memory; reads return copies."""

    def __init__(self, arrays: Mapping[str, Array]) -> None:
        self.arrays = dict(arrays)
        self.layout: Layout = {k: (v.dtype, v.shape[1:]) for k, v in self.arrays.items()}
        self.num_samples = _common_count({k: len(v) for k, v in self.arrays.items()}, "arrays")

    def reader(self) -> Reader:
        return self

    def read(self, start: int, stop: int) -> dict[str, Array]:
        return {name: array[start:stop].copy() for name, array in self.arrays.items()}

    def close(self) -> None:
        return None


class ArraysSource:
    """Arrays in one or more containers (a .npz, or one .npy per input), read row by row."""

    def __init__(self, containers: Sequence[Container], label: str) -> None:
        self.containers = list(containers)
        arrays = {n: a for c in self.containers for n, a in c.arrays.items()}
        if not arrays:
            raise DatasetError(f"{label} holds no arrays.", hint=LAYOUT_HINT)
        self.layout: Layout = {
            n: (a.dtype.newbyteorder("="), a.shape[1:]) for n, a in arrays.items()
        }
        self.num_samples = _common_count({n: a.shape[0] for n, a in arrays.items()}, label)

    def reader(self) -> Reader:
        return _ArraysReader([_ContainerReader(c) for c in self.containers])


class _ArraysReader:
    def __init__(self, readers: list[_ContainerReader]) -> None:
        self._readers = readers

    def read(self, start: int, stop: int) -> dict[str, Array]:
        return {k: v for r in self._readers for k, v in r.read(start, stop).items()}

    def close(self) -> None:
        for reader in self._readers:
            reader.close()


def _describe(layout: Layout) -> str:
    return ", ".join(f"{n} {d.name}{list(s)}" for n, (d, s) in sorted(layout.items()))


class ShardSource:
    """Shards with the same inputs, concatenated in the order given; one is open at a time."""

    def __init__(self, shards: Sequence[tuple[str, ArraysSource]]) -> None:
        self.shards = [shard for _, shard in shards]
        self.layout = self.shards[0].layout
        for label, shard in shards:
            if shard.layout != self.layout:
                raise DatasetError(
                    f"Shard {label!r} has inputs {_describe(shard.layout)} but the first shard has "
                    f"{_describe(self.layout)}.",
                    hint="Every shard needs the same input names, dtypes and per-sample shapes.",
                )
        self.ends = np.cumsum([shard.num_samples for shard in self.shards])
        self.num_samples = int(self.ends[-1])

    def reader(self) -> Reader:
        return _ShardReader(self)


class _ShardReader:
    def __init__(self, source: ShardSource) -> None:
        self._source = source
        self._current: tuple[int, Reader] | None = None

    def read(self, start: int, stop: int) -> dict[str, Array]:
        ends, parts = self._source.ends, []
        while start < stop:
            index = int(np.searchsorted(ends, start, side="right"))
            first = int(ends[index]) - self._source.shards[index].num_samples
            end = min(stop, int(ends[index]))
            parts.append(self._shard(index).read(start - first, end - first))
            start = end
        return concat(parts)

    def _shard(self, index: int) -> Reader:
        if self._current is None or self._current[0] != index:
            self.close()
            self._current = (index, self._source.shards[index].reader())
        return self._current[1]

    def close(self) -> None:
        if self._current is not None:
            self._current[1].close()
            self._current = None


class ImageSource:
    """A zip of JPEG/PNG files (``members``, in order) decoded and preprocessed per read."""

    def __init__(
        self, path: Path, members: list[str], spec: PreprocessSpec, name: str, limits: ArchiveLimits
    ) -> None:
        self.path, self.members, self.spec, self.name, self.limits = (
            path,
            members,
            spec,
            name,
            limits,
        )
        self.num_samples = len(members)
        check_preprocess_size(spec, limits.max_preprocessed_pixels)
        crop = spec.crop_hw
        if crop is not None:
            shape: tuple[int, ...] = spec.sample_shape(*crop)
        else:  # the size follows the images: take the first one's
            with open_zip(path, path.name, limits) as archive:
                shape = self._decode(archive, members[0]).shape
        self.layout: Layout = {name: (np.dtype(spec.dtype), shape)}

    def _decode(self, archive: zipfile.ZipFile, member: str) -> Array:
        label = f"{self.path.name}:{member}"
        info = archive.getinfo(member)
        if info.file_size > MAX_IMAGE_FILE_BYTES:
            raise ArchiveError(
                f"Image {label!r} is a {info.file_size:,}-byte file, more than the limit of "
                f"{MAX_IMAGE_FILE_BYTES:,}.",
                hint="Pack model-sized JPEG or PNG files.",
            )
        data = read_member(archive, info, label)
        return decode_image(data, self.spec, label, self.limits.max_preprocessed_pixels)

    def reader(self) -> Reader:
        return _ImageReader(self)


class _ImageReader:
    def __init__(self, source: ImageSource) -> None:
        self._source = source
        self._archive = open_zip(source.path, source.path.name, source.limits)

    def read(self, start: int, stop: int) -> dict[str, Array]:
        source = self._source
        expected = source.layout[source.name][1]
        samples = []
        for member in source.members[start:stop]:
            sample = source._decode(self._archive, member)
            if sample.shape != expected:
                raise DatasetError(
                    f"Image {source.path.name}:{member} gives a sample of shape {sample.shape}, "
                    f"the first image {expected}.",
                    hint="Set center_crop in the preprocessing spec so every image has one size.",
                )
            samples.append(sample)
        return {source.name: np.stack(samples)}

    def close(self) -> None:
        self._archive.close()
