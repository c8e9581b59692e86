"""From an ONNX model and a dataset to a calibration table: collect -> histogram -> method -> table."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from calibrators.collect import COLLECTOR_VERSION, collect
from calibrators.data import CalibrationDataset
from calibrators.errors import CalibrationError
from calibrators.histogram import HistogramCollector, HistogramMode
from calibrators.methods import CalibrationMethod, MethodSpec
from calibrators.table import CalibrationTable, algorithm_for_method

__all__ = ["MaxCollector", "calibrate", "sha256_file", "table_cache_key"]


class MaxCollector:
    """Observer keeping only max|x| per tensor: all the min-max method needs."""

    def __init__(self) -> None:
        self._max: dict[str, float] = {}

    def observe(self, name: str, values: np.ndarray) -> None:
        if values.size == 0:
            return
        peak = float(max(np.max(values), -np.min(values)))
        if not np.isfinite(peak):
            raise CalibrationError(
                f"Tensor {name!r} produced NaN or Inf during calibration.",
                hint="Check the dataset's preprocessing; the model overflows on these inputs.",
            )
        self._max[name] = max(self._max.get(name, 0.0), peak)

    def amax(self) -> dict[str, float]:
        return dict(self._max)


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in ``chunk_bytes`` chunks (1 MiB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def table_cache_key(
    model_sha256: str, dataset_sha256: str, method: MethodSpec, histogram: HistogramMode
) -> str:
    """sha256(model) + sha256(dataset) + method + params + collector version (ARCHITECTURE §3)."""
    parts = [
        model_sha256,
        dataset_sha256,
        method.model_dump_json(),
        str(histogram),
        COLLECTOR_VERSION,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def calibrate(
    model_path: Path,
    dataset: CalibrationDataset,
    method: MethodSpec,
    *,
    histogram: HistogramMode = HistogramMode.EXACT,
    batch_size: int | None = None,
    max_samples: int | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationTable:
    """Compute a calibration table for every float activation of ``model_path``."""
    use_histogram = method.method is not CalibrationMethod.MINMAX
    observer: HistogramCollector | MaxCollector = (
        HistogramCollector(mode=histogram) if use_histogram else MaxCollector()
    )
    samples = collect(
        model_path,
        dataset,
        observer,
        batch_size=batch_size,
        max_samples=max_samples,
        threads=threads,
        progress=progress,
    )
    if isinstance(observer, HistogramCollector):
        amax = {name: float(method.compute_amax(h)) for name, h in observer.histograms().items()}
    else:
        amax = observer.amax()
    params = dict(method.params)
    if use_histogram:
        params["histogram"] = str(histogram)
    return CalibrationTable(
        amax=amax,
        method=method.method,
        parameters=params,
        samples=samples,
        model_sha256=sha256_file(model_path),
        dataset_sha256=dataset.digest,
        algorithm=algorithm_for_method(method.method),
        trt_version=None,
    )
