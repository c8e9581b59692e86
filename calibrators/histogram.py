"""Histograms of |x| per tensor, for the histogram-based calibration methods.

Two modes (:class:`HistogramMode`):

``exact`` (default)
    The histogram the methods see is exactly ``numpy.histogram(np.abs(x), num_bins, (0, M))``,
    ``x`` every value of the tensor over the whole dataset and ``M`` their max|x|: integer counts,
    bit for bit, whatever the batch order or size. The bins depend on ``M``, which is known only
    once every value has been seen, so the collector takes two passes over the data
    (:meth:`HistogramCollector.passes`): the first keeps max|x| per tensor, the second bins every
    value into the ``num_bins`` bins over ``[0, M]`` as numpy does (the float bin index
    ``(|x| / M) * num_bins`` truncated, then corrected against numpy's float edges, the last bin
    closed; :func:`calibrators.kernels.numpy_histogram`). Memory is ``num_bins`` counts per tensor.
    Two deliberate differences from numpy, neither of which real data meets: an all-zero tensor
    (``M == 0``; numpy would bin it over ``[-0.5, 0.5]``) counts everything in bin 0, and where
    ``M`` is so small that numpy refuses ("Too many bins for data range": float32 edges collide)
    the edges are float64.

``tensorrt``
    TensorRT's own behaviour, for users who must match a TensorRT 10 table: the range is set by the
    first batch's max|x| with ``num_bins`` bins; when a later batch's max exceeds the range, the
    range doubles (repeatedly) by merging adjacent bin pairs into the lower half, then the batch is
    binned in the current range. The result depends on batch order and batch size (that is the
    point): a run whose first batch has a small range keeps finer bins than one that starts wide.
    Here ``Histogram.max_abs`` is the final range, which may exceed the data's max|x|. One pass;
    two when a batch reaches the collector in several micro-batches (a memory limit smaller than a
    batch's activations): the first records each batch's max|x|, the second takes each batch's
    range decision before its first micro-batch, so the counts are those of whole batches.

Values are observed as |x|; NaN or Inf refuses the tensor with a :class:`CalibrationError` naming it.
A collector may observe different tensors from different threads at once (:meth:`observe_batch`
does), never the same tensor.

Passes: :meth:`HistogramCollector.begin_pass` starts pass ``index`` (0 on construction) and
:meth:`HistogramCollector.end_batch` marks the end of a batch (tensorrt mode's unit);
:func:`calibrators.collect.collect` calls both, and :func:`histograms_of` runs the passes over
batches held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from calibrators.errors import CalibrationError
from calibrators.spec import HistogramMode

__all__ = [
    "DEFAULT_NUM_BINS",
    "Histogram",
    "HistogramCollector",
    "histograms_of",
    "kernels",
    "numpy_bins",
    "with_aliases",
]

DEFAULT_NUM_BINS = 2048
"""Bins of the histograms handed to the methods (TensorRT's and pytorch-quantization's choice)."""

_MAX_ABS_LIMIT = 2.0**1000
"""A tensor above it (float64 only) cannot be quantized to INT8 meaningfully: refused."""

T = TypeVar("T")
FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of |x| in ``num_bins`` equal bins over ``[0, max_abs]`` (read-only).

    ``counts`` is int64 as both modes produce it (float64 is accepted for synthetic histograms);
    bin ``k`` spans ``[k * bin_width, (k + 1) * bin_width)``, the last one closed at ``max_abs``.
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
        """Sum of the counts: the number of values observed."""
        return float(self.counts.sum())


def numpy_bins(
    max_abs: float, dtype: npt.DTypeLike, num_bins: int = DEFAULT_NUM_BINS
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """What :func:`calibrators.kernels.numpy_histogram` needs to bin ``dtype`` values as
    ``numpy.histogram(|x|, num_bins, (0, max_abs))``: numpy's bin edges, ``[max_abs - 0,
    num_bins]`` in the dtype numpy computes bin indices in, and ``[num_bins / max_abs, guard]``.

    The first two come from numpy itself (``histogram_bin_edges`` and its type promotion), so the
    kernel reproduces whichever numpy is installed. Where numpy refuses the range (float32 edges
    that collide below ~1e-35) the edges are float64. ``guard`` (in bins) bounds the rounding of a
    value's position and of the edges, beyond which the kernel needs no edge (1: always compare).
    """
    probe = np.empty(0, dtype=dtype)
    try:
        edges = np.histogram_bin_edges(probe, num_bins, (0.0, max_abs))
    except ValueError:
        edges = np.linspace(0.0, max_abs, num_bins + 1)
    # numpy.histogram: f = ((a - first) / (last - first)) * bins, last - first in the range's type
    denominator = np.subtract(max_abs, 0.0)
    index_dtype = (probe.astype(edges.dtype) / denominator).dtype
    unit = max(float(np.finfo(edges.dtype).eps), float(np.finfo(index_dtype).eps))
    guard = 4.0 * num_bins * unit
    fast = np.array([num_bins / max_abs, guard if guard < 0.25 else 1.0], dtype=np.float64)
    return edges, np.array([denominator, num_bins], dtype=index_dtype), fast


@dataclass
class _ExactState:
    """max|x| (first pass), then numpy's counts over [0, max|x|] (second pass)."""

    max_abs: float = 0.0
    counts: IntArray | None = None
    bins: dict[np.dtype[Any], tuple[FloatArray, FloatArray, FloatArray]] = field(
        default_factory=dict
    )
    batches: int = 0


@dataclass
class _TensorRTState:
    """TensorRT-style histogram: ``num_bins`` bins over [0, range]."""

    counts: IntArray
    range_abs: float = 0.0
    batches: int = 0
    pending_zeros: int = 0
    batch_peaks: dict[int, float] = field(default_factory=dict)
    """max|x| per batch, from the first pass when batches arrive split into micro-batches."""
    ranged_batch: int = -1
    """The last batch whose range decision was taken (second pass of split batches)."""

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

    def take_range(self, peak: float) -> bool:
        """TensorRT's per-batch range decision; False while the range is unset and ``peak`` is 0
        (the batch's zeros then wait for the first batch that sets one)."""
        if self.range_abs == 0.0:
            if peak == 0.0:
                return False
            self.range_abs = peak
        elif peak > self.range_abs:
            self.grow_to(peak)
        return True


class HistogramCollector:
    """Observer building one |x| histogram per tensor (see the module docstring for the modes).

    >>> collector = HistogramCollector()
    >>> for index in range(collector.passes(split_batches=False)):
    ...     collector.begin_pass(index, ["relu1"])
    ...     collector.observe("relu1", np.array([0.0, -1.0, 0.5], dtype=np.float32))
    >>> hist = collector.histograms()["relu1"]
    >>> hist.max_abs, int(hist.counts[0]), int(hist.counts[1024]), int(hist.counts[2047])
    (1.0, 1, 1, 1)
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
        self._pass = 0
        self._batch = 0
        self._split = False
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

    def passes(self, split_batches: bool) -> int:
        """Passes over the data this collector needs: 2 in exact mode; in tensorrt mode 1, or 2
        when ``split_batches`` (a batch arrives in several micro-batches, each followed by
        :meth:`observe_batch` and the batch by :meth:`end_batch`)."""
        self._split = bool(split_batches)
        if self._mode is HistogramMode.EXACT:
            return 2
        return 2 if self._split else 1

    def begin_pass(self, index: int, tensors: Sequence[str] = ()) -> None:
        """Start pass ``index`` over the whole dataset for ``tensors`` (informative: a run whose
        activations exceed its memory limit passes over the data once per group of tensors)."""
        if index < 0 or index >= self.passes(self._split):
            raise ValueError(f"pass index must be in [0, {self.passes(self._split)}), got {index}")
        self._pass, self._batch = index, 0
        for exact in self._exact.values():
            exact.batches = 0
        for trt in self._trt.values():
            trt.batches = 0

    def end_batch(self) -> None:
        """The batch (tensorrt mode's unit: TensorRT's calibration batch) is complete."""
        self._batch += 1

    def observe(self, name: str, values: npt.ArrayLike) -> None:
        """Add ``name``'s values of the current batch (any shape; |x| is counted). Empty arrays are
        ignored. In exact mode the first pass keeps max|x| and the second counts.

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
                if self._pass > 0:
                    raise _unseen(name)
                state = self._exact[name] = _ExactState()
            return state
        trt = self._trt.get(name)
        if trt is None:
            trt = self._trt[name] = _TensorRTState(np.zeros(self._num_bins, dtype=np.int64))
        return trt

    def histograms(self) -> dict[str, Histogram]:
        """One :class:`Histogram` per observed tensor, ``num_bins`` bins each (see the modes).

        Raises:
            CalibrationError: exact mode before the second pass counted a tensor.
        """
        out: dict[str, Histogram] = {}
        for name, state in self._exact.items():
            if state.counts is None:
                raise _unseen(name)
            out[name] = Histogram(counts=state.counts.copy(), max_abs=state.max_abs)
        for name, trt in self._trt.items():
            counts = trt.counts.copy()
            counts[0] += trt.pending_zeros
            out[name] = Histogram(counts=counts, max_abs=trt.range_abs)
        return with_aliases(out, self._order, self._aliases)

    # -- exact mode -------------------------------------------------------------------------

    def _observe_exact(self, name: str, state: _ExactState, flat: FloatArray) -> None:
        flat = np.ascontiguousarray(flat)
        k = kernels()
        bits, layout = k.float_bits(flat)
        if self._pass == 0:
            peak_bits = k.abs_peak_bits(bits, layout.abs_mask)
            if not layout.is_finite(peak_bits):
                raise _non_finite(name, state.batches)
            peak = layout.to_float(peak_bits)
            if peak > _MAX_ABS_LIMIT:
                raise _overflow(name, peak)
            state.max_abs = max(state.max_abs, peak)
            return
        if state.counts is None:
            state.counts = np.zeros(self._num_bins, dtype=np.int64)
        if state.max_abs == 0.0:  # numpy would bin over [-0.5, 0.5]; every value is 0 here
            state.counts[0] += flat.size
            return
        bins = state.bins.get(flat.dtype)
        if bins is None:
            bins = state.bins[flat.dtype] = numpy_bins(state.max_abs, flat.dtype, self._num_bins)
        _, bad = k.numpy_histogram(
            flat, bits, layout.abs_mask, layout.inf_bits, *bins, state.counts
        )
        if bad >= 0:
            raise _non_finite(name, state.batches)

    # -- tensorrt mode ----------------------------------------------------------------------

    def _observe_tensorrt(self, name: str, state: _TensorRTState, flat: FloatArray) -> None:
        flat = np.ascontiguousarray(flat)
        k = kernels()
        bits, layout = k.float_bits(flat)
        peak_bits = k.abs_peak_bits(bits, layout.abs_mask)
        if not layout.is_finite(peak_bits):
            raise _non_finite(name, state.batches)
        peak = layout.to_float(peak_bits)
        if self._split and self._pass == 0:  # only the batch's max: its range decision comes next
            state.batch_peaks[self._batch] = max(state.batch_peaks.get(self._batch, 0.0), peak)
            return
        if self._split:
            if state.ranged_batch != self._batch:
                state.ranged_batch = self._batch
                state.take_range(state.batch_peaks.pop(self._batch, peak))
            ranged = state.range_abs > 0.0
        else:
            ranged = state.take_range(peak)
        if not ranged:
            state.pending_zeros += flat.size
            return
        # |x| == range (or rounding above it) lands in the last bin
        k.binned_histogram(flat, flat.dtype.type(self._num_bins / state.range_abs), state.counts)


def histograms_of(
    batches: Sequence[Mapping[str, npt.ArrayLike]],
    mode: HistogramMode = HistogramMode.EXACT,
    num_bins: int = DEFAULT_NUM_BINS,
    *,
    workers: int | None = None,
) -> dict[str, Histogram]:
    """Histograms of batches held in memory (``name -> values`` per batch), after as many passes
    over them as ``mode`` needs. Tensors keep their first-seen order."""
    collector = HistogramCollector(mode, num_bins, workers=workers)
    for index in range(collector.passes(split_batches=False)):
        collector.begin_pass(index)
        for batch in batches:
            collector.observe_batch([(name, np.asarray(v)) for name, v in batch.items()])
            collector.end_batch()
    return collector.histograms()


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


def _unseen(name: str) -> CalibrationError:
    return CalibrationError(
        f"Tensor {name!r} has no exact histogram: exact mode counts in a second pass over the data, "
        "after a first one has seen every value of the tensor.",
        hint="Run both passes (collector.passes(), begin_pass(0) and begin_pass(1), each over the "
        "whole dataset), as calibrators.collect.collect and histograms_of do.",
        field=name,
    )


def _non_finite(name: str, batch: int) -> CalibrationError:
    return CalibrationError(
        f"Tensor {name!r} holds NaN or Inf (in its batch {batch}); it cannot be calibrated.",
        hint="Check the dataset's preprocessing and value ranges; the model overflows on these inputs.",
        field=name,
    )
