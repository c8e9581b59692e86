"""Streaming histograms of |x| per tensor, for the histogram-based calibration methods.

Two modes (:class:`HistogramMode`):

``exact`` (default)
    The histogram the methods see is ``num_bins`` bins over exactly ``[0, max|x|]`` of the whole
    dataset, as if the data had been collected in two passes (one for the maximum, one for the
    counts), so the table depends neither on batch order nor on batch size.

    Streaming, it keeps per tensor a *fine* histogram of ``F`` bins (``F`` = the power of two at or
    above ``8 * num_bins``; 16384 for 2048 bins) over ``[0, R)``, ``R`` a power of two strictly
    greater than the running max|x|. The bin of a value is ``floor(|x| * (F / R))``, and because
    ``F / R`` is a power of two that product is exact in float32 and float64, so the bin is exact.
    When a value reaches ``R``, ``R`` doubles (``k`` times at once if needed) and adjacent bin pairs
    fold together: the bins stay aligned (``floor(floor(y) / 2) == floor(y / 2)``), so folding loses
    nothing and the fine counts at the end are exactly those a single pass at the final ``R`` would
    give. They depend only on the global max, hence not on order or batch size. The exact max|x| is
    kept beside them.

    :meth:`HistogramCollector.histograms` then re-bins the fine histogram to ``num_bins`` bins over
    ``[0, max|x|]``, splitting each fine bin across target edges in proportion to the overlap
    (linear interpolation of the cumulative counts; the fine bin holding the max is taken to end at
    the max). Counts become float64. This is the one approximation: within a fine bin the values are
    assumed spread evenly. Since ``R <= 2 * max|x|``, every target bin spans at least 4 fine bins
    (8 when max|x| is a power of two), so at most a quarter of a target bin's width is blurred at
    each of its edges.

``tensorrt``
    TensorRT's own behaviour, for users who must match a TensorRT 10 table: the range is set by the
    first batch's max|x| with ``num_bins`` bins; when a later batch's max exceeds the range, the
    range doubles (repeatedly) by merging adjacent bin pairs into the lower half, then the batch is
    binned in the current range. The result depends on batch order and batch size (that is the
    point): a run whose first batch has a small range keeps finer bins than one that starts wide.
    Here ``Histogram.max_abs`` is the final range, which may exceed the data's max|x|.

Values are observed as |x|; NaN or Inf refuses the tensor with a :class:`CalibrationError` naming it.
A collector may observe different tensors from different threads at once (:meth:`observe_batch`
does), never the same tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from calibrators.errors import CalibrationError

__all__ = [
    "DEFAULT_NUM_BINS",
    "Histogram",
    "HistogramCollector",
    "HistogramMode",
    "kernels",
    "with_aliases",
]

DEFAULT_NUM_BINS = 2048
"""Bins of the histograms handed to the methods (TensorRT's and pytorch-quantization's choice)."""

_FINE_FACTOR = 8
"""Fine bins per output bin in exact mode (at least; rounded up to a power of two)."""

_MIN_LOG2_RANGE = -100
"""Exact mode's smallest fine range, 2**-100: keeps ``F / R`` a normal float32 (<= 2**127).

Tensors whose max|x| is below 2**-100 (about 8e-31) get fewer than 4 fine bins per output bin.
"""

_MAX_LOG2_RANGE = 1000
"""Largest range 2**1000: a float64 tensor above it cannot be quantized to INT8 meaningfully."""

T = TypeVar("T")
FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.int64]


class HistogramMode(StrEnum):
    """How a streaming histogram's range follows the data."""

    EXACT = "exact"
    """Order- and batch-size-independent: 2048 bins over exactly [0, max|x| of the dataset]."""
    TENSORRT = "tensorrt"
    """TensorRT's: range from the first batch, doubled by merging bin pairs when exceeded."""


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of |x| in ``num_bins`` equal bins over ``[0, max_abs]`` (read-only).

    ``counts`` is int64 (tensorrt mode) or float64 (exact mode, re-binned); bin ``k`` spans
    ``[k * bin_width, (k + 1) * bin_width)``, the last one closed at ``max_abs``.
    """

    counts: npt.NDArray[np.int64] | npt.NDArray[np.float64]
    max_abs: float

    def __post_init__(self) -> None:
        raw = np.asarray(self.counts)
        if raw.ndim != 1 or raw.size == 0:
            raise ValueError(
                f"Histogram counts must be a non-empty 1-D array, got shape {raw.shape}."
            )
        if np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_:
            counts: npt.NDArray[np.int64] | npt.NDArray[np.float64] = raw.astype(np.int64)
        elif np.issubdtype(raw.dtype, np.floating):
            counts = raw.astype(np.float64)
        else:
            raise ValueError(f"Histogram counts must be integers or floats, got {raw.dtype}.")
        if not bool(np.all(np.isfinite(counts))) or bool(np.any(counts < 0)):
            raise ValueError("Histogram counts must be finite and non-negative.")
        max_abs = float(self.max_abs)
        if not math.isfinite(max_abs) or max_abs < 0:
            raise ValueError(f"Histogram max_abs must be finite and >= 0, got {self.max_abs!r}.")
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "max_abs", max_abs)

    @property
    def num_bins(self) -> int:
        """Number of bins."""
        return int(self.counts.size)

    @property
    def bin_width(self) -> float:
        """Width of one bin: ``max_abs / num_bins`` (0 for an all-zero tensor)."""
        return self.max_abs / self.num_bins

    @property
    def total(self) -> float:
        """Sum of the counts: the number of values observed (up to float rounding in exact mode)."""
        return float(self.counts.sum())


@dataclass
class _ExactState:
    """Fine histogram over [0, 2**log2_range) plus the exact max|x|."""

    counts: IntArray
    log2_range: int = _MIN_LOG2_RANGE
    max_abs: float = 0.0
    batches: int = 0

    def grow(self, log2_range: int) -> None:
        """Double the range ``log2_range - self.log2_range`` times, folding bins (exactly)."""
        steps = log2_range - self.log2_range
        fine = self.counts.size
        if steps >= fine.bit_length() - 1:  # everything lands in bin 0
            total = self.counts.sum()
            self.counts[:] = 0
            self.counts[0] = total
        else:
            kept = fine >> steps
            self.counts[:kept] = self.counts.reshape(kept, 1 << steps).sum(axis=1)
            self.counts[kept:] = 0
        self.log2_range = log2_range


@dataclass
class _TensorRTState:
    """TensorRT-style histogram: ``num_bins`` bins over [0, range]."""

    counts: IntArray
    range_abs: float = 0.0
    batches: int = 0
    pending_zeros: int = field(default=0)

    def grow_to(self, peak: float) -> None:
        """Double the range until it covers ``peak``, merging adjacent bin pairs each time."""
        half = self.counts.size // 2
        while self.range_abs < peak:
            merged = self.counts[: 2 * half].reshape(half, 2).sum(axis=1)
            if self.counts.size % 2:  # odd bin count: the last bin joins the top merged bin
                merged[-1] += self.counts[-1]
            self.counts[:] = 0
            self.counts[:half] = merged
            self.range_abs *= 2.0


class HistogramCollector:
    """Observer building one |x| histogram per tensor (see the module docstring for the modes).

    >>> collector = HistogramCollector()
    >>> collector.observe("relu1", np.array([0.0, -1.0, 0.5], dtype=np.float32))
    >>> collector.histograms()["relu1"].max_abs
    1.0
    """

    def __init__(
        self,
        mode: HistogramMode = HistogramMode.EXACT,
        num_bins: int = DEFAULT_NUM_BINS,
        *,
        workers: int | None = None,
    ) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins must be an integer >= 2, got {num_bins!r}.")
        self._mode = HistogramMode(mode)
        self._order: tuple[str, ...] | None = None
        self._aliases: dict[str, str] = {}
        self._workers = workers or kernels().available_cpus()
        self._num_bins = num_bins
        self._fine_bins = 1 << (_FINE_FACTOR * num_bins - 1).bit_length()
        self._exact: dict[str, _ExactState] = {}
        self._trt: dict[str, _TensorRTState] = {}

    @property
    def mode(self) -> HistogramMode:
        """The collector's :class:`HistogramMode`."""
        return self._mode

    @property
    def num_bins(self) -> int:
        """Bins of the histograms :meth:`histograms` returns."""
        return self._num_bins

    @property
    def fine_bins(self) -> int:
        """Bins of the streaming histogram kept per tensor in exact mode."""
        return self._fine_bins

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Tensors with a histogram: in :meth:`begin`'s order with its aliases when it was called,
        else in first-observed order."""
        states = self._exact if self._mode is HistogramMode.EXACT else self._trt
        return tuple(with_aliases(dict.fromkeys(states), self._order, self._aliases))

    @property
    def aliases(self) -> Mapping[str, str]:
        """Alias -> source, as announced by :meth:`begin`."""
        return dict(self._aliases)

    def begin(self, tensors: Sequence[str], aliases: Mapping[str, str]) -> None:
        """Announce the run's tensors (their order is the histograms' order) and the aliases,
        which share their source's histogram (see :func:`calibrators.collect.collect`)."""
        self._order, self._aliases = tuple(tensors), dict(aliases)

    def observe(self, name: str, values: npt.ArrayLike) -> None:
        """Add one batch of ``name``'s values (any shape; |x| is counted). Empty arrays are ignored.

        Raises:
            CalibrationError: the values hold NaN or Inf, are not real numbers, or overflow.
        """
        flat = _as_float_vector(name, values)
        if flat.size == 0:
            return
        state = self._state(name)
        state.batches += 1
        if isinstance(state, _ExactState):
            self._observe_exact(name, state, flat)
        else:
            self._observe_tensorrt(name, state, flat)

    def observe_batch(self, tensors: Sequence[tuple[str, npt.NDArray[Any]]]) -> None:
        """:meth:`observe` every ``(name, values)`` of one batch (distinct names).

        The tensors are binned on up to ``workers`` threads at once (the compiled kernels release
        the GIL); the order of :attr:`tensor_names` stays that of ``tensors``.
        """
        for name, values in tensors:
            if np.size(values):
                self._state(name)
        kernels().for_each_tensor(self.observe, tensors, self._workers)

    def _state(self, name: str) -> _ExactState | _TensorRTState:
        if self._mode is HistogramMode.EXACT:
            state = self._exact.get(name)
            if state is None:
                state = self._exact[name] = _ExactState(np.zeros(self._fine_bins, dtype=np.int64))
            return state
        trt = self._trt.get(name)
        if trt is None:
            trt = self._trt[name] = _TensorRTState(np.zeros(self._num_bins, dtype=np.int64))
        return trt

    def histograms(self) -> dict[str, Histogram]:
        """One :class:`Histogram` per observed tensor, ``num_bins`` bins each (see the modes)."""
        out: dict[str, Histogram] = {}
        if self._mode is HistogramMode.EXACT:
            out = {name: self._rebin(state) for name, state in self._exact.items()}
        for name, trt in self._trt.items():
            counts = trt.counts.copy()
            counts[0] += trt.pending_zeros
            out[name] = Histogram(counts=counts, max_abs=trt.range_abs)
        return with_aliases(out, self._order, self._aliases)

    # -- exact mode -------------------------------------------------------------------------

    def _observe_exact(self, name: str, state: _ExactState, flat: FloatArray) -> None:
        # One compiled pass (calibrators.kernels.fine_histogram): per L1-sized chunk, its max|x|
        # (growing the range first if needed: growth mid-batch is fine, the fine counts only depend
        # on the final range), then bin = floor(|x| * 2**k) into the fine counts.
        flat = np.ascontiguousarray(flat)
        k = kernels()
        bits, layout = k.float_bits(flat)
        peak_bits, log2_range, bad = k.fine_histogram(
            flat,
            bits,
            layout.abs_mask,
            layout.inf_bits,
            layout.mantissa_bits,
            layout.bias,
            state.log2_range,
            _MIN_LOG2_RANGE,
            state.counts,
        )
        state.log2_range = log2_range
        if bad >= 0:
            raise _non_finite(name, state.batches)
        if log2_range > _MAX_LOG2_RANGE:
            raise _overflow(name, layout.to_float(peak_bits))
        state.max_abs = max(state.max_abs, layout.to_float(peak_bits))

    def _rebin(self, state: _ExactState) -> Histogram:
        total = float(state.counts.sum())
        out = np.zeros(self._num_bins, dtype=np.float64)
        if state.max_abs == 0.0:
            out[0] = total
            return Histogram(counts=out, max_abs=0.0)
        # Positions in fine-bin units: fine bin j spans [j, j + 1), except the one holding the max,
        # which ends at the max (every value is <= max). Cumulative counts at those edges,
        # interpolated linearly at the target edges, give each target bin its share.
        top = state.max_abs * math.ldexp(1.0, self._fine_bins.bit_length() - 1 - state.log2_range)
        last = min(int(top), self._fine_bins - 1)
        edges = np.arange(last + 2, dtype=np.float64)
        edges[-1] = top
        cumulative = np.zeros(last + 2, dtype=np.float64)
        np.cumsum(state.counts[: last + 1], out=cumulative[1:])
        at_targets = np.interp(np.linspace(0.0, top, self._num_bins + 1), edges, cumulative)
        at_targets[0] = 0.0
        at_targets[-1] = total
        np.maximum(np.diff(at_targets), 0.0, out=out)
        return Histogram(counts=out, max_abs=state.max_abs)

    # -- tensorrt mode ----------------------------------------------------------------------

    def _observe_tensorrt(self, name: str, state: _TensorRTState, flat: FloatArray) -> None:
        flat = np.ascontiguousarray(flat)
        k = kernels()
        bits, layout = k.float_bits(flat)
        peak_bits = k.abs_peak_bits(bits, layout.abs_mask)
        if not layout.is_finite(peak_bits):
            raise _non_finite(name, state.batches)
        peak = layout.to_float(peak_bits)
        if state.range_abs == 0.0:
            if peak == 0.0:  # no range yet: zeros wait for the first batch that sets one
                state.pending_zeros += flat.size
                return
            state.range_abs = peak
        elif peak > state.range_abs:
            state.grow_to(peak)
        # |x| == range (or rounding above it) lands in the last bin
        k.binned_histogram(flat, flat.dtype.type(self._num_bins / state.range_abs), state.counts)


def with_aliases(
    own: dict[str, T], order: Sequence[str] | None, aliases: Mapping[str, str]
) -> dict[str, T]:
    """``own`` (per observed tensor) in ``order`` with every alias given its source's value; as is
    when there is no order. Tensors with no value (never observed, e.g. empty) are left out."""
    if order is None:
        return own
    out: dict[str, T] = {}
    for name in order:
        source = aliases.get(name, name)
        if source in own:
            out[name] = own[source]
    return out


def kernels() -> ModuleType:
    """:mod:`calibrators.kernels`, imported on first use: numba (0.3 s, ~100 MB) loads only in
    processes that compute statistics, not in every importer of :class:`HistogramMode`."""
    import calibrators.kernels

    return calibrators.kernels


def _as_float_vector(name: str, values: npt.ArrayLike) -> FloatArray:
    """``values`` flattened, as float32 (half precision widened exactly) or float64."""
    array = np.asarray(values)
    if array.dtype in (np.float32, np.float64):
        return array.reshape(-1)
    if array.dtype == np.float16:
        return array.reshape(-1).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array.reshape(-1).astype(np.float64)
    raise CalibrationError(
        f"Tensor {name!r} has dtype {array.dtype}; histograms take real numbers.",
        hint="Observe only float activations (collect() does this).",
        field=name,
    )


def _overflow(name: str, peak: float) -> CalibrationError:
    return CalibrationError(
        f"Tensor {name!r} has |x| up to {peak:g}, beyond any INT8 range.",
        hint="Check the model and the dataset's preprocessing; the activations overflow.",
        field=name,
    )


def _non_finite(name: str, batch: int) -> CalibrationError:
    return CalibrationError(
        f"Tensor {name!r} holds NaN or Inf (in its batch {batch}); it cannot be calibrated.",
        hint="Check the dataset's preprocessing and value ranges; the model overflows on these inputs.",
        field=name,
    )
