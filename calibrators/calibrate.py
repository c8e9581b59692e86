"""From an ONNX model and a dataset to a calibration table: collect -> histogram -> method -> table."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from calibrators.amax import compute_amax
from calibrators.auto import choose_ranges
from calibrators.collect import COLLECTOR_VERSION, collect
from calibrators.data import CalibrationDataset
from calibrators.errors import CalibrationError
from calibrators.histogram import HistogramCollector, kernels, with_aliases
from calibrators.spec import CalibrationMethod, HistogramMode, MethodSpec
from calibrators.table import CalibrationTable, RangeChoice, algorithm_for_method
from core.hashing import sha256_file
from core.onnxio import load_onnx

__all__ = ["MaxCollector", "activation_bounds", "calibrate", "table_cache_key"]


class MaxCollector:
    """Observer keeping only max|x| per tensor: all the min-max method needs."""

    def __init__(self, *, workers: int | None = None) -> None:
        self._max: dict[str, float] = {}
        self._order: tuple[str, ...] | None = None
        self._aliases: dict[str, str] = {}
        self._workers = workers or kernels().available_cpus()

    def begin(self, tensors: Sequence[str], aliases: Mapping[str, str]) -> None:
        self._order, self._aliases = tuple(tensors), dict(aliases)

    def observe(self, name: str, values: np.ndarray) -> None:
        if values.size == 0:
            return
        flat = np.ascontiguousarray(values).reshape(-1)
        if flat.dtype not in (np.float32, np.float64):
            flat = flat.astype(np.float32)
        k = kernels()
        bits, layout = k.float_bits(flat)
        peak_bits = k.abs_peak_bits(bits, layout.abs_mask)
        if not layout.is_finite(peak_bits):
            raise CalibrationError(
                f"Tensor {name!r} produced NaN or Inf during calibration.",
                hint="Check the dataset's preprocessing; the model overflows on these inputs.",
                field=name,
            )
        self._max[name] = max(self._max.get(name, 0.0), layout.to_float(peak_bits))

    def observe_batch(self, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
        for name, values in tensors:  # keep graph order in the table
            if values.size:
                self._max.setdefault(name, 0.0)
        kernels().for_each_tensor(self.observe, tensors, self._workers)

    def amax(self) -> dict[str, float]:
        return with_aliases(dict(self._max), self._order, self._aliases)


def activation_bounds(model: onnx.ModelProto, folder: Path | None = None) -> dict[str, float]:
    """Output tensor -> the upper bound of |x| of bounded activations (Clip with constant bounds,
    Sigmoid, HardSigmoid, Tanh).

    Only the scalar constants a Clip reads are converted. One stored as external data is read from
    ``folder``, the model's own folder, and nowhere else (never the working directory); without
    ``folder`` such a bound counts as unknown.
    """
    clips = [node for node in model.graph.node if node.op_type == "Clip"]
    wanted = {name for node in clips for name in node.input[1:3]}
    constants: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if tensor.name in wanted and math.prod(tensor.dims) == 1:
            value = _scalar_constant(tensor, folder)
            if value is not None:
                constants[tensor.name] = value
    for node in model.graph.node:
        if (
            node.op_type == "Constant"
            and node.output
            and node.output[0] in wanted
            and node.attribute
            and node.attribute[0].HasField("t")
            and math.prod(node.attribute[0].t.dims) == 1
        ):
            value = _scalar_constant(node.attribute[0].t, folder)
            if value is not None:
                constants[node.output[0]] = value
    bounds: dict[str, float] = {}
    for node in model.graph.node:
        if not node.output:
            continue
        if node.op_type in ("Sigmoid", "HardSigmoid", "Tanh"):
            bounds[node.output[0]] = 1.0
        elif node.op_type == "Clip":
            limits = _clip_limits(node, constants)
            if limits is not None:
                bounds[node.output[0]] = max(abs(limits[0]), abs(limits[1]))
    return bounds


def _scalar_constant(tensor: onnx.TensorProto, folder: Path | None) -> np.ndarray | None:
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    if folder is None:
        return None
    # onnx resolves a relative location against base_dir; "" would mean the working directory
    return numpy_helper.to_array(tensor, base_dir=str(folder.resolve()))


def _clip_limits(
    node: onnx.NodeProto, constants: dict[str, np.ndarray]
) -> tuple[float, float] | None:
    attrs = {a.name: a.f for a in node.attribute}
    if "min" in attrs or "max" in attrs:  # opset < 11
        return attrs.get("min", -np.inf), attrs.get("max", np.inf)
    names = list(node.input[1:3]) + [""] * (3 - len(node.input))
    values = []
    for name, default in zip(names[:2], (-np.inf, np.inf), strict=True):
        if not name:
            values.append(default)
        elif name in constants and constants[name].size == 1:
            values.append(float(constants[name].reshape(())))
        else:
            return None  # computed bounds: unknown here
    low, high = values
    return (low, high) if np.isfinite(low) and np.isfinite(high) else None


def _saturated_bounds(peaks: dict[str, float], bounds: dict[str, float]) -> dict[str, float]:
    """The bounded activations whose data reaches the bound: tensor -> bound."""
    return {
        name: bound
        for name, bound in bounds.items()
        if name in peaks and peaks[name] >= bound * (1 - 1e-6)
    }


def _keep_saturated_bounds(
    amax: dict[str, float], peaks: dict[str, float], bounds: dict[str, float]
) -> dict[str, float]:
    out = dict(amax)
    for name, bound in _saturated_bounds(peaks, bounds).items():
        if name in out:
            out[name] = max(out[name], bound)
    return out


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
    keep_activation_bounds: bool = True,
    progress: Callable[[int, int], None] | None = None,
    memory_limit_bytes: int | None = None,
) -> CalibrationTable:
    """Compute a calibration table for every float activation of ``model_path``.

    Collection keeps its activations within ``memory_limit_bytes`` (``None``: 1 GiB) whatever
    ``batch_size`` is (:mod:`calibrators.memory`); histogram methods pass over the data twice in
    ``exact`` mode (the range, then numpy's exact counts; :mod:`calibrators.histogram`).

    ``method`` ``auto`` (the default everywhere) runs one more, short pass over the dataset's
    first samples to judge its candidate ranges at the outputs of the weighted nodes reading each
    tensor, and records every choice in ``range_choices`` (see :mod:`calibrators.auto`).

    ``keep_activation_bounds``: a histogram method never clips the output of a bounded activation
    (ReLU6-style Clip, Sigmoid, HardSigmoid, Tanh) below its bound when the data reaches it. Such
    outputs pile up exactly at the bound (a ReLU6 saturates), and the KL criterion, which weighs
    how often values move rather than how far, happily clips that spike: EfficientNet-Lite0's
    late ReLU6 outputs get amax 3.4 instead of 6, mapping every saturated value to 3.4.
    """
    use_histogram = method.method is not CalibrationMethod.MINMAX
    observer: HistogramCollector | MaxCollector = (
        HistogramCollector(mode=histogram, workers=threads)
        if use_histogram
        else MaxCollector(workers=threads)
    )
    samples = collect(
        model_path,
        dataset,
        observer,
        batch_size=batch_size,
        max_samples=max_samples,
        threads=threads,
        progress=progress,
        memory_limit_bytes=memory_limit_bytes,
    )
    params = dict(method.params)
    choices: dict[str, RangeChoice] | None = None
    if isinstance(observer, HistogramCollector):
        histograms = observer.histograms()
        aliases = observer.aliases
        # ranges of the observed tensors only; an alias then takes its source's (bound included)
        observed = {name: h for name, h in histograms.items() if name not in aliases}
        peaks = {name: h.max_abs for name, h in observed.items()}
        bounds = (
            activation_bounds(
                load_onnx(model_path, load_external_data=False), Path(model_path).parent
            )
            if keep_activation_bounds
            else {}
        )
        if method.method is CalibrationMethod.AUTO:
            ranges = choose_ranges(
                model_path,
                dataset,
                observed,
                aliases,
                method,
                calibration_samples=samples,
                bounds=_saturated_bounds(peaks, bounds),
                batch_size=batch_size,
                threads=threads,
                memory_limit_bytes=memory_limit_bytes,
            )
            amax = ranges.amax
            choices = with_aliases(ranges.choices, list(histograms), aliases)
            params["measured_samples"] = ranges.measured_samples
        else:
            amax = {name: float(compute_amax(method, h)) for name, h in observed.items()}
        params["histogram"] = str(histogram)
        if keep_activation_bounds:
            amax = _keep_saturated_bounds(amax, peaks, bounds)
            params["keep_activation_bounds"] = "yes"
        amax = with_aliases(amax, list(histograms), aliases)
    else:
        amax = observer.amax()
    return CalibrationTable(
        amax=amax,
        method=method.method,
        parameters=params,
        samples=samples,
        model_sha256=sha256_file(model_path),
        dataset_sha256=dataset.digest,
        algorithm=algorithm_for_method(method.method),
        trt_version=None,
        range_choices=choices,
    )
