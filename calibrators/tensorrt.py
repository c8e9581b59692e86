"""TensorRT 10's native INT8 calibrators, fed from a CalibrationDataset through cuda-python.

TensorRT 10 (deprecated since 10.1, removed in 11.0) calibrates an implicitly quantized network
itself: the builder asks an ``IInt8EntropyCalibrator2`` / ``IInt8MinMaxCalibrator`` for batches
in device memory and stores the ranges it computed through ``write_calibration_cache``; when
``read_calibration_cache`` returns a cache whose header matches, it skips calibration. Here the
cache is trtforge's :class:`CalibrationTable`: a table TensorRT computed is handed to a callback
(or saved) so it is kept and reused, and any trtforge table can be served as the cache.

``tensorrt`` and cuda-python are imported inside functions only, so this module imports anywhere.
The calibrator class is created when :func:`native_calibrator` is called, from the base class its
algorithm names (as Polygraphy does); it delegates to :class:`CalibratorCore`, plain Python.
Exceptions raised while TensorRT calls back into Python cannot cross TensorRT's C++ frames, so
they are kept in :attr:`CalibratorCore.error` (the callback then ends calibration) and re-raised
by :meth:`CalibratorCore.raise_error`, which builders call after ``build_serialized_network``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from calibrators.errors import CalibrationError, DatasetError
from calibrators.spec import CalibrationMethod
from calibrators.table import CalibrationTable, TensorRTAlgorithm, trt_version_number
from core.cuda import cuda_call, import_cudart
from core.errors import TensorRTUnavailableError
from core.tensorrt import require_tensorrt, tensorrt_module
from core.tensors import TensorSpec

if TYPE_CHECKING:
    from calibrators.data import CalibrationDataset

__all__ = [
    "BatchFeeder",
    "CalibratorCore",
    "DeviceBatchFeeder",
    "NativeCalibrator",
    "native_calibrator",
]

log = logging.getLogger(__name__)

_ALGORITHM_METHODS = {
    TensorRTAlgorithm.ENTROPY2: CalibrationMethod.ENTROPY,
    TensorRTAlgorithm.MINMAX: CalibrationMethod.MINMAX,
}


class DeviceBatchFeeder:
    """Device buffers for a model's inputs, sized for ``max_batch`` samples; copies batches in.

    ``inputs`` are per-sample specs (no batch axis, static dims), e.g. ``dataset.specs``. Use it
    in a ``with`` block: :meth:`close` frees the device memory.
    """

    def __init__(self, inputs: Sequence[TensorSpec], max_batch: int, *, device: int = 0) -> None:
        if max_batch < 1:
            raise CalibrationError(f"max_batch must be >= 1, got {max_batch}.", field="batch_size")
        self.max_batch = max_batch
        self.device = device
        self._specs = {spec.name: _static_spec(spec) for spec in inputs}
        self._cudart = import_cudart()
        self._pointers: dict[str, int] = {}
        cuda_call(self._cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        try:
            for name, (shape, dtype) in self._specs.items():
                nbytes = max(1, max_batch * math.prod(shape) * dtype.itemsize)
                ptr = cuda_call(
                    self._cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {name!r}"
                )
                self._pointers[name] = int(ptr)
        except BaseException:
            self.close()
            raise

    @property
    def pointers(self) -> dict[str, int]:
        """Device address of each input's buffer."""
        return dict(self._pointers)

    def copy(self, batch: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Copy one batch (arrays with a leading batch axis) to the device; returns the pointers."""
        if not self._pointers and self._specs:
            raise CalibrationError(
                "The batch feeder is closed.", hint="Use it inside its `with` block."
            )
        missing = [name for name in self._specs if name not in batch]
        if missing:
            raise DatasetError(
                f"The batch lacks input(s) {', '.join(missing)}.",
                hint=f"Provide every input: {', '.join(self._specs)}.",
                field="dataset",
            )
        kind = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, (shape, dtype) in self._specs.items():
            array = np.ascontiguousarray(batch[name])
            self._check(name, array, shape, dtype)
            cuda_call(
                self._cudart.cudaMemcpy(
                    self._pointers[name], array.ctypes.data, array.nbytes, kind
                ),
                f"cudaMemcpy host->device for {name!r}",
            )
        return self.pointers

    def _check(
        self, name: str, array: np.ndarray, shape: tuple[int, ...], dtype: np.dtype[Any]
    ) -> None:
        if array.dtype != dtype:
            raise DatasetError(
                f"Input {name!r} arrived as {array.dtype.name}, the device buffer holds {dtype.name}.",
                hint="Validate the dataset against the model (CalibrationDataset.validate) first.",
                field="dataset",
            )
        if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != shape:
            raise DatasetError(
                f"Input {name!r} has shape {array.shape}; expected (batch, {', '.join(map(str, shape))}).",
                field="dataset",
            )
        if array.shape[0] > self.max_batch:
            raise DatasetError(
                f"Batch of {array.shape[0]} samples for {name!r} exceeds the buffers' {self.max_batch}.",
                hint="Use a batch size no larger than the feeder's max_batch.",
                field="batch_size",
            )

    def close(self) -> None:
        """Free the device buffers (idempotent)."""
        pointers, self._pointers = self._pointers, {}
        errors = [self._cudart.cudaFree(ptr)[0] for ptr in pointers.values()]
        failed = [e for e in errors if int(e) != 0]
        if failed:
            log.warning("cudaFree failed for %d buffer(s): %s", len(failed), failed[0])

    def __enter__(self) -> DeviceBatchFeeder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _static_spec(spec: TensorSpec) -> tuple[tuple[int, ...], np.dtype[Any]]:
    if not all(isinstance(d, int) and d >= 0 for d in spec.shape):
        raise DatasetError(
            f"Input {spec.name!r} has per-sample shape {spec.shape}; device buffers need static dims.",
            hint="Calibrate with arrays of one fixed shape per input.",
            field="dataset",
        )
    return tuple(int(d) for d in spec.shape if d is not None), np.dtype(spec.dtype)


class BatchFeeder(Protocol):
    """What :class:`CalibratorCore` needs from a feeder (:class:`DeviceBatchFeeder` in use)."""

    def copy(self, batch: Mapping[str, np.ndarray]) -> dict[str, int]: ...

    def close(self) -> None: ...


class CalibratorCore:
    """What a native calibrator does, independent of TensorRT's base class (see module docstring).

    ``batches`` yields full batches of exactly ``batch_size`` samples (a short last batch ends
    calibration: TensorRT needs every batch at the calibration profile's shape). ``served`` is the
    table offered as TensorRT's cache (its header rewritten for ``algorithm`` and
    ``trt_version``); ``on_table`` receives the table TensorRT computed.
    """

    def __init__(
        self,
        *,
        algorithm: TensorRTAlgorithm,
        batch_size: int,
        trt_version: int,
        batches: Iterator[Mapping[str, np.ndarray]] | None = None,
        feeder: BatchFeeder | None = None,
        served: CalibrationTable | None = None,
        on_table: Callable[[CalibrationTable], None] | None = None,
        dataset_digest: Callable[[], str] | None = None,
    ) -> None:
        self.algorithm = TensorRTAlgorithm(algorithm)
        self.batch_size = batch_size
        self.trt_version = trt_version
        self._batches = batches
        self._feeder = feeder
        self._served = served
        self._on_table = on_table
        self._dataset_digest = dataset_digest
        self.samples_fed = 0
        self.table: CalibrationTable | None = None
        """The table TensorRT wrote, once it has."""
        self.error: BaseException | None = None
        """The first exception raised inside a TensorRT callback."""

    def get_batch_size(self) -> int:
        """The calibration batch size TensorRT must expect."""
        return self.batch_size

    def get_batch(self, names: Sequence[str]) -> list[int] | None:
        """Device pointers of the next batch in ``names`` order; None when there is no more."""
        if self._batches is None or self._feeder is None or self.error is not None:
            return None
        try:
            batch = next(self._batches, None)
            if batch is None:
                return None
            count = len(next(iter(batch.values())))
            if count < self.batch_size:
                log.info("Calibration: dropping the last, partial batch of %d samples.", count)
                return None
            pointers = self._feeder.copy(batch)
            unknown = [n for n in names if n not in pointers]
            if unknown:
                raise DatasetError(
                    f"TensorRT asks for input(s) {', '.join(map(repr, unknown))}, which the dataset lacks.",
                    hint=f"The dataset has: {', '.join(pointers)}.",
                    field="dataset",
                )
            self.samples_fed += count
            return [pointers[n] for n in names]
        except Exception as exc:  # must not cross TensorRT's C++ frames; re-raised by raise_error
            self._keep(exc)
            return None

    def read_calibration_cache(self) -> bytes | None:
        """The served table as TensorRT's cache text, or None to make TensorRT calibrate."""
        if self._served is None:
            return None
        try:
            table = self._served
            if table.algorithm is not self.algorithm:
                log.info(
                    "Serving a %s table to the %s calibrator.", table.algorithm, self.algorithm
                )
            text = table.with_algorithm(self.algorithm).to_cache_text(self.trt_version)
            return text.encode("utf-8")
        except Exception as exc:
            self._keep(exc)
            return None

    def write_calibration_cache(self, cache: Any) -> None:
        """Keep the table TensorRT computed and hand it to ``on_table``."""
        try:
            text = bytes(cache).decode("utf-8")
            computed = CalibrationTable.from_cache_text(text)
            table = computed.model_copy(
                update={
                    "method": _ALGORITHM_METHODS.get(computed.algorithm),
                    "parameters": {"calibrator": f"tensorrt {computed.algorithm.value}"},
                    "samples": self.samples_fed,
                    "dataset_sha256": self._dataset_digest() if self._dataset_digest else None,
                }
            )
            self.table = table
            if self._on_table is not None:
                self._on_table(table)
        except Exception as exc:
            self._keep(exc)

    def _keep(self, exc: Exception) -> None:
        log.error("Native calibrator callback failed: %s", exc)
        if self.error is None:
            self.error = exc

    def raise_error(self) -> None:
        """Re-raise the first exception a TensorRT callback swallowed, if any."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Free the device buffers."""
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None
        self._batches = None


class NativeCalibrator(Protocol):
    """A ``trt.IInt8*Calibrator`` subclass instance from :func:`native_calibrator`."""

    core: CalibratorCore

    def get_batch_size(self) -> int: ...

    def get_batch(self, names: list[str]) -> list[int] | None: ...

    def read_calibration_cache(self) -> bytes | None: ...

    def write_calibration_cache(self, cache: Any) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> NativeCalibrator: ...

    def __exit__(self, *exc: object) -> None: ...


def native_calibrator(
    dataset: CalibrationDataset | None,
    algorithm: TensorRTAlgorithm | str = TensorRTAlgorithm.ENTROPY2,
    *,
    batch_size: int = 16,
    max_samples: int | None = None,
    table: CalibrationTable | Path | None = None,
    on_table: Callable[[CalibrationTable], None] | None = None,
    device: int = 0,
) -> NativeCalibrator:
    """A TensorRT 10 calibrator of ``algorithm`` (EntropyCalibration2, MinMaxCalibration or
    EntropyCalibration) fed from ``dataset`` (validated against the model already).

    ``table`` is served as TensorRT's calibration cache: a :class:`CalibrationTable`, or a path to
    one (read when it exists; TensorRT's table is saved there when ``on_table`` is None). With a
    table and no dataset, TensorRT must accept the table: no batches exist to calibrate with.
    Raises :class:`TensorRTUnavailableError` when TensorRT (or cuda-python, with a dataset) is
    missing or is 11.x, which has no implicit quantization. Use the result in a ``with`` block.
    """
    version = require_tensorrt()
    trt_version = trt_version_number(version)
    if trt_version >= 110000:
        raise TensorRTUnavailableError(
            f"TensorRT {version} has no native INT8 calibrators (removed in TensorRT 11).",
            hint="Calibrate with trtforge (`trtforge calibrate`) and build in explicit mode.",
        )
    trt = tensorrt_module()
    algorithm = TensorRTAlgorithm(algorithm)
    bases: dict[TensorRTAlgorithm, Any] = {
        TensorRTAlgorithm.ENTROPY2: trt.IInt8EntropyCalibrator2,
        TensorRTAlgorithm.MINMAX: trt.IInt8MinMaxCalibrator,
        TensorRTAlgorithm.ENTROPY: trt.IInt8EntropyCalibrator,
    }
    if algorithm not in bases:
        raise CalibrationError(
            f"trtforge has no native calibrator for {algorithm.value}.",
            hint="Use EntropyCalibration2 or MinMaxCalibration.",
            field="algorithm",
        )
    served, on_table = _table_io(table, on_table)
    core = _core(dataset, algorithm, batch_size, max_samples, served, on_table, trt_version, device)
    base = bases[algorithm]

    class _Calibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # pybind11 needs the trampoline's constructor called
            self.core = core

        def get_batch_size(self) -> int:
            return core.get_batch_size()

        def get_batch(self, names: list[str]) -> list[int] | None:
            return core.get_batch(names)

        def read_calibration_cache(self) -> bytes | None:
            return core.read_calibration_cache()

        def write_calibration_cache(self, cache: Any) -> None:
            core.write_calibration_cache(cache)

        def close(self) -> None:
            core.close()

        def __enter__(self) -> _Calibrator:
            return self

        def __exit__(self, *exc: object) -> None:
            core.close()

    _Calibrator.__name__ = _Calibrator.__qualname__ = f"Trtforge{base.__name__}"
    calibrator: NativeCalibrator = _Calibrator()
    return calibrator


def _table_io(
    table: CalibrationTable | Path | None, on_table: Callable[[CalibrationTable], None] | None
) -> tuple[CalibrationTable | None, Callable[[CalibrationTable], None] | None]:
    if not isinstance(table, Path | str):
        return table, on_table
    path = Path(table)
    served = CalibrationTable.load(path) if path.exists() else None
    if on_table is None:

        def on_table(computed: CalibrationTable) -> None:
            computed.save(path)

    return served, on_table


def _core(
    dataset: CalibrationDataset | None,
    algorithm: TensorRTAlgorithm,
    batch_size: int,
    max_samples: int | None,
    served: CalibrationTable | None,
    on_table: Callable[[CalibrationTable], None] | None,
    trt_version: int,
    device: int,
) -> CalibratorCore:
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be >= 1, got {batch_size}.", field="batch_size")
    if dataset is None:
        if served is None:
            raise CalibrationError(
                "A native calibrator needs a dataset to calibrate with or a table to serve.",
                hint="Pass the calibration dataset, or a table computed by `trtforge calibrate`.",
            )
        return CalibratorCore(
            algorithm=algorithm, batch_size=batch_size, trt_version=trt_version, served=served
        )
    if dataset.num_samples < batch_size:
        raise DatasetError(
            f"The dataset has {dataset.num_samples} samples, fewer than one batch of {batch_size}.",
            hint="Lower the batch size or add samples.",
            field="batch_size",
        )
    feeder = DeviceBatchFeeder(dataset.specs, batch_size, device=device)
    return CalibratorCore(
        algorithm=algorithm,
        batch_size=batch_size,
        trt_version=trt_version,
        batches=iter(dataset.batches(batch_size, max_samples=max_samples)),
        feeder=feeder,
        served=served,
        on_table=on_table,
        dataset_digest=lambda: dataset.digest,
    )
