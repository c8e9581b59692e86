"""Calibration datasets: read lazily, validated against a model's inputs, batched, digested.

Accepted containers (samples along the first axis everywhere):

- ``.npz``: one array per model input, keyed by input name (``np.savez`` / ``np.savez_compressed``);
- a directory or ``.zip`` of ``.npz`` shards, taken in sorted file-name order;
- a directory or ``.zip`` of ``.npy`` files, one per input, named after it (an unpacked ``.npz``);
- one ``.npy`` for a single-input model;
- a ``.zip`` of JPEG/PNG images plus a :class:`PreprocessSpec`, for single-image-input models.

Nothing is loaded up front (:mod:`calibrators.sources`): sample rows are read when a batch needs
them, shards are held one at a time and images are decoded per batch, so memory does not grow with
the sample count. Arrays are never unpickled. Zip archives are checked before anything is
extracted (:mod:`calibrators.archive`, :class:`ArchiveLimits`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from calibrators.archive import ArchiveLimits, file_members, open_zip
from calibrators.errors import DatasetError
from calibrators.images import IMAGE_SUFFIXES
from calibrators.sources import (
    LAYOUT_HINT,
    PICKLE_HINT,
    ArraysSource,
    ImageSource,
    MemorySource,
    ShardSource,
    Source,
    concat,
    npy_container,
    npz_container,
    zip_shards,
)
from calibrators.spec import PreprocessSpec
from core.tensors import TensorSpec

__all__ = [
    "ArchiveLimits",
    "CalibrationDataset",
    "PreprocessSpec",
]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]
_HASH_BATCH_BYTES = 16 << 20


# --- opening files ---------------------------------------------------------------------------------


def _member_kind(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return "image" if suffix in IMAGE_SUFFIXES else suffix.lstrip(".") or "(no suffix)"


def _open_directory(path: Path, limits: ArchiveLimits) -> Source:
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    shards = [p for p in files if p.suffix.lower() == ".npz"]
    arrays = [p for p in files if p.suffix.lower() == ".npy"]
    if shards and not arrays:
        return ShardSource(
            [(p.name, ArraysSource([npz_container(p, limits)], p.name)) for p in shards]
        )
    if arrays and not shards:
        return ArraysSource([npy_container(p, p.stem) for p in arrays], path.name)
    raise DatasetError(
        f"Directory {path.name!r} must hold either .npz shards or .npy arrays "
        f"(found {len(shards)} .npz and {len(arrays)} .npy files).",
        hint=LAYOUT_HINT,
    )


def _open_zip_dataset(
    path: Path, preprocess: PreprocessSpec | None, limits: ArchiveLimits, name: str
) -> Source:
    with open_zip(path, path.name, limits) as archive:
        members = [info.filename for info in file_members(archive)]
    kinds = sorted({_member_kind(member) for member in members})
    if kinds == ["npy"]:
        return ArraysSource([npz_container(path, limits)], path.name)
    if kinds == ["npz"]:
        return ShardSource([(m, ArraysSource([c], m)) for m, c in zip_shards(path, limits)])
    if kinds == ["image"]:
        if preprocess is None:
            raise DatasetError(
                f"{path.name} holds images but no preprocessing spec was given.",
                hint="Pass a preprocessing spec JSON (--preprocess SPEC.json).",
                field="preprocess",
            )
        return ImageSource(path, members, preprocess, name, limits)
    raise DatasetError(
        f"{path.name} must hold only .npy arrays, only .npz shards or only JPEG/PNG images "
        f"(found: {', '.join(kinds) or 'nothing'}).",
        hint=LAYOUT_HINT,
    )


def _open_source(
    path: Path, preprocess: PreprocessSpec | None, limits: ArchiveLimits, name: str
) -> Source:
    suffix = path.suffix.lower()
    if path.is_dir():
        return _open_directory(path, limits)
    if suffix in (".npz", ".zip") or (suffix != ".npy" and zipfile.is_zipfile(path)):
        return _open_zip_dataset(path, preprocess, limits, name)
    if suffix == ".npy":
        return ArraysSource([npy_container(path, name)], path.name)
    raise DatasetError(
        f"{path.name} is not a supported dataset format.",
        hint="Use .npz, a .zip or directory of .npz shards, a .npy, or a .zip of JPEG/PNG images.",
    )


# --- the dataset ---------------------------------------------------------------------------------


def _cast_needs_check(name: str, source: np.dtype[Any], target: np.dtype[Any]) -> bool:
    """Whether casting ``source`` to ``target`` needs a per-value check; refuses lossy casts."""
    if source == target or np.can_cast(source, target, "safe"):
        return False
    if source.kind == "f" and target.kind == "f":
        # narrowing floats rounds to nearest (the documented rule); an overflow to inf is refused
        # by the finiteness check, naming the first bad sample
        log.warning(
            "Input %r: %s samples are rounded to the model's %s (to nearest; ranges change by at "
            "most its precision, %.1e relative).",
            name,
            source.name,
            target.name,
            float(np.finfo(target).eps) / 2,
        )
        return False
    if source.kind in "biu" and target.kind in "biuf":
        return True  # fine when every value survives the round trip
    raise DatasetError(
        f"Input {name!r} holds {source.name} but the model takes {target.name}; the cast would "
        "lose information.",
        hint=f"Store {name!r} as {target.name} (or a type that converts to it exactly).",
        field=name,
    )


def _check_shape(name: str, sample: tuple[int, ...], model: tuple[int | str | None, ...]) -> None:
    if not model:
        return  # the model does not say its rank
    dims = [d if isinstance(d, int) else "?" for d in model]
    wanted = f"[batch, {', '.join(map(str, dims[1:]))}]"
    if len(model) != len(sample) + 1 or any(
        isinstance(want, int) and want != got for want, got in zip(model[1:], sample, strict=False)
    ):
        raise DatasetError(
            f"Input {name!r}: samples have shape {list(sample)} but the model takes {wanted} "
            f"(model shape {dims}).",
            hint="Store samples along the first axis, each shaped like the model input without "
            "its batch axis.",
            field=name,
        )


def _first_bad(mask: Array) -> int | None:
    rows = mask.reshape(len(mask), -1).any(axis=1)
    hits = np.flatnonzero(rows)
    return int(hits[0]) if hits.size else None


def _hash_batch(digest: Any, batch: Mapping[str, Array]) -> None:
    names = sorted(batch)
    for index in range(len(batch[names[0]])):
        for name in names:
            row = np.ascontiguousarray(batch[name][index])
            shape = ",".join(map(str, row.shape))
            digest.update(f"{name}\0{row.dtype.str}\0{shape}\0".encode())
            digest.update(row.data)


class CalibrationDataset:
    """Samples for calibration, read lazily from a file or held in memory.

    Build one with :meth:`open` or :meth:`from_arrays`; :meth:`validate` checks it against a
    model's inputs and returns a dataset whose batches are cast to the model's dtypes.
    """

    def __init__(
        self,
        source: Source,
        *,
        indices: Array | None = None,
        rename: Mapping[str, str] | None = None,
        casts: Mapping[str, np.dtype[Any]] | None = None,
        renameable: bool = False,
        digest: str | None = None,
    ) -> None:
        self._source = source
        self._indices = indices
        self._rename = dict(rename or {n: n for n in source.layout})
        self._casts = dict(casts or {})
        self._renameable = renameable
        self._digest = digest

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        preprocess: PreprocessSpec | None = None,
        limits: ArchiveLimits | None = None,
        input_name: str | None = None,
    ) -> CalibrationDataset:
        """Open a dataset file or directory lazily (see the module docstring for formats).

        ``input_name`` names the input of a single ``.npy`` or an image zip; without it,
        :meth:`validate` takes the model's only input. Raises :class:`DatasetError` (or
        :class:`ArchiveError` for unsafe archives).
        """
        path = Path(path)
        if not path.exists():
            raise DatasetError(f"Dataset {str(path)!r} does not exist.", field="data")
        name = input_name or (path.stem if path.suffix.lower() == ".npy" else "input")
        try:
            source = _open_source(path, preprocess, limits or ArchiveLimits(), name)
        except OSError as exc:
            raise DatasetError(f"Cannot read dataset {path.name!r}: {exc}.", field="data") from exc
        if preprocess is not None and not isinstance(source, ImageSource):
            raise DatasetError(
                f"A preprocessing spec was given but {path.name!r} holds arrays, not images.",
                hint="Drop the preprocessing spec, or upload a .zip of JPEG/PNG images.",
                field="preprocess",
            )
        # A lone .npy or an image zip carries no input name: validate() may take the model's.
        unnamed = isinstance(source, ImageSource) or path.suffix.lower() == ".npy"
        return cls(source, renameable=input_name is None and unnamed)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Array]) -> CalibrationDataset:
        """An in-memory dataset: one array per input name, samples along the first axis."""
        checked: dict[str, Array] = {}
        for name, value in arrays.items():
            array = np.asarray(value)
            if array.dtype.hasobject or array.dtype.kind not in "biuf":
                raise DatasetError(f"Array {name!r} has dtype {array.dtype}: {PICKLE_HINT}.")
            if array.ndim == 0:
                raise DatasetError(f"Array {name!r} is a scalar; it needs a sample axis.")
            checked[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
        if not checked:
            raise DatasetError("No arrays were given.", hint=LAYOUT_HINT)
        return cls(MemorySource(checked))

    @property
    def names(self) -> tuple[str, ...]:
        """Input names, sorted."""
        return tuple(sorted(self._rename.values()))

    @property
    def num_samples(self) -> int:
        """Number of samples."""
        return self._source.num_samples if self._indices is None else len(self._indices)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        """Per-input dtype (after validation: the model's) and per-sample shape, sorted by name."""
        specs = []
        for source_name, (dtype, shape) in self._source.layout.items():
            name = self._rename[source_name]
            specs.append(TensorSpec(name, self._casts.get(name, dtype).name, tuple(shape)))
        return tuple(sorted(specs, key=lambda spec: spec.name))

    def _derive(self, **changes: Any) -> CalibrationDataset:
        state: dict[str, Any] = {
            "indices": self._indices,
            "rename": self._rename,
            "casts": self._casts,
            "renameable": self._renameable,
        }
        state.update(changes)
        return CalibrationDataset(self._source, **state)

    def batches(
        self, batch_size: int, *, max_samples: int | None = None
    ) -> Iterator[dict[str, Array]]:
        """Batches in dataset order: input name -> array with a leading batch axis.

        The last batch may be short; ``max_samples`` stops after that many samples.
        """
        if batch_size < 1:
            raise DatasetError(
                f"Batch size must be at least 1, got {batch_size}.", field="batch_size"
            )
        if max_samples is not None and max_samples < 1:
            raise DatasetError(
                f"max_samples must be at least 1, got {max_samples}.", field="max_samples"
            )
        count = self.num_samples if max_samples is None else min(max_samples, self.num_samples)
        return self._iterate(batch_size, count, cast=True)

    def _iterate(self, batch_size: int, count: int, *, cast: bool) -> Iterator[dict[str, Array]]:
        reader = self._source.reader()
        try:
            for start in range(0, count, batch_size):
                stop = min(start + batch_size, count)
                if self._indices is None:
                    raw = reader.read(start, stop)
                else:
                    chunk = self._indices[start:stop]
                    runs = np.split(chunk, np.flatnonzero(np.diff(chunk) != 1) + 1)
                    raw = concat([reader.read(int(r[0]), int(r[-1]) + 1) for r in runs])
                batch = {self._rename[k]: v for k, v in raw.items()}
                if cast:
                    batch = {
                        k: v.astype(self._casts.get(k, v.dtype), copy=False)
                        for k, v in batch.items()
                    }
                yield dict(sorted(batch.items()))
        finally:
            reader.close()

    def _hash_batch_size(self) -> int:
        sample_bytes = sum(d.itemsize * math.prod(s) for d, s in self._source.layout.values())
        return max(1, min(1024, _HASH_BATCH_BYTES // max(1, sample_bytes)))

    @property
    def digest(self) -> str:
        """sha256 (hex) of the canonical content, the same whatever container holds it.

        For each sample in order and each input in sorted name order: the name, the dtype string,
        the per-sample shape and the C-order bytes. Computed once, streaming.
        """
        if self._digest is None:
            digest = hashlib.sha256()
            for batch in self.batches(self._hash_batch_size()):
                _hash_batch(digest, batch)
            self._digest = digest.hexdigest()
        return self._digest

    def _match_names(self, model: Mapping[str, TensorSpec]) -> dict[str, str]:
        names = self.names
        if self._renameable and len(names) == 1 and len(model) == 1 and names[0] not in model:
            return {names[0]: next(iter(model))}
        missing, extra = sorted(set(model) - set(names)), sorted(set(names) - set(model))
        if missing or extra:
            problems = []
            if missing:
                problems.append(f"missing {', '.join(map(repr, missing))}")
            if extra:
                problems.append(f"not inputs of the model: {', '.join(map(repr, extra))}")
            hint = f"Key the arrays by the model's input names: {', '.join(sorted(model))}."
            if self._renameable:
                hint = f"Name the input this dataset feeds (input_name=): one of {sorted(model)}."
            raise DatasetError(
                f"Dataset inputs do not match the model's: {'; '.join(problems)}.",
                hint=hint,
                field="data",
            )
        return {name: name for name in names}

    def validate(self, inputs: Sequence[TensorSpec]) -> CalibrationDataset:
        """Check names, dtypes, shapes, finiteness and sample count against the model's inputs.

        Returns a dataset yielding arrays cast to the model's dtypes, its digest computed in the
        same streaming pass. Raises :class:`DatasetError` naming the input and the fix.
        """
        model = {spec.name: spec for spec in inputs}
        mapping = self._match_names(model)
        renamed = self._derive(
            rename={k: mapping[v] for k, v in self._rename.items()}, casts={}, renameable=False
        )
        targets: dict[str, np.dtype[Any]] = {}
        checks: dict[str, bool] = {}
        for source_name, (dtype, shape) in self._source.layout.items():
            name = renamed._rename[source_name]
            try:
                targets[name] = np.dtype(model[name].dtype)
            except TypeError as exc:
                raise DatasetError(
                    f"Model input {name!r} has dtype {model[name].dtype!r}, which numpy cannot hold.",
                    field=name,
                ) from exc
            checks[name] = _cast_needs_check(name, dtype, targets[name])
            _check_shape(name, shape, model[name].shape)
        if renamed.num_samples == 0:
            raise DatasetError(
                "The dataset has no samples.", hint="Add at least one sample.", field="data"
            )
        digest = hashlib.sha256()
        done = 0
        for batch in renamed._iterate(renamed._hash_batch_size(), renamed.num_samples, cast=False):
            cast = {
                name: _checked_cast(name, v, targets[name], checks[name], done)
                for name, v in batch.items()
            }
            _hash_batch(digest, cast)
            done += len(next(iter(batch.values())))
        return renamed._derive(casts=targets, digest=digest.hexdigest())

    def split(
        self, eval_fraction: float, seed: int = 0
    ) -> tuple[CalibrationDataset, CalibrationDataset]:
        """Deterministic disjoint (calibration, evaluation) subsets, each in dataset order.

        ``eval_fraction`` in [0, 1) of the samples (at least one when positive and there are two
        or more) are drawn with ``np.random.default_rng(seed).permutation``.
        """
        calibration, evaluation = self.split_indices(eval_fraction, seed)
        return self.subset(calibration), self.subset(evaluation)

    def split_indices(self, eval_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
        """The sample positions :meth:`split` puts in (calibration, evaluation), each sorted."""
        if not 0 <= eval_fraction < 1:
            raise DatasetError(
                f"eval_fraction must be in [0, 1), got {eval_fraction}.", field="eval_fraction"
            )
        total = self.num_samples
        held = round(total * eval_fraction)
        if eval_fraction > 0 and total >= 2:
            held = min(max(held, 1), total - 1)
        order = np.random.default_rng(seed).permutation(total)
        return np.sort(order[held:]).tolist(), np.sort(order[:held]).tolist()

    def subset(self, indices: Sequence[int]) -> CalibrationDataset:
        """The samples at ``indices`` (positions in this dataset), in the order given."""
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_samples):
            raise DatasetError(
                f"Sample indices must be in [0, {self.num_samples}).", field="indices"
            )
        base = np.arange(self._source.num_samples) if self._indices is None else self._indices
        return self._derive(indices=base[positions], digest=None)


def _checked_cast(
    name: str, values: Array, target: np.dtype[Any], check: bool, offset: int
) -> Array:
    with np.errstate(invalid="ignore", over="ignore"):
        cast = values.astype(target, copy=False)
        bad = _first_bad(cast.astype(values.dtype) != values) if check else None
    if bad is not None:
        raise DatasetError(
            f"Input {name!r} sample {offset + bad} holds values that do not fit {target.name}.",
            hint=f"Store {name!r} as {target.name} or keep values in its range.",
            field=name,
        )
    if target.kind == "f":
        bad = _first_bad(~np.isfinite(cast))
        if bad is not None:
            what = (
                "NaN or Inf"
                if not np.isfinite(values[bad]).all()
                else f"values beyond {target.name}"
            )
            raise DatasetError(
                f"Input {name!r} sample {offset + bad} holds {what}.",
                hint="Remove or fix that sample; calibration needs finite values.",
                field=name,
            )
    return cast
