"""Compiled inner loops of activation statistics (numba): one pass over a tensor's memory.

A CNN's activations are tens of millions of values per sample, far beyond the caches, so what a
statistic costs is mostly how many times it walks them. numpy needs several passes and scratch
arrays per statistic (abs, max, divide, compare, bincount); these kernels read each value once and
release the GIL, so :class:`calibrators.histogram.HistogramCollector` can bin several tensors on
several cores at the same time.

max|x| works on the IEEE-754 bits (``values.view(uint32)`` for float32, ``uint64`` for float64):
``bits & ~sign`` orders non-negative floats like the floats themselves, so max|x| is an integer
max that vectorizes without fast-math, and a result at or above the infinity pattern means the
tensor holds NaN or Inf.

:func:`numpy_histogram` bins |x| exactly as ``numpy.histogram(np.abs(x), bins, (0, top))`` does,
bit for bit: the same float bin index, truncated, then corrected against the same float edges.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

import numba
import numpy as np
import numpy.typing as npt

__all__ = [
    "FloatBits",
    "abs_peak_bits",
    "available_cpus",
    "binned_histogram",
    "float_bits",
    "for_each_tensor",
    "numpy_histogram",
]

_CHUNK = 4096
"""Values per chunk: the chunk's max is found, then the same (L1-resident) values are binned."""

_LANES = 4
"""Independent sub-histograms: consecutive values hitting the same bin (a ReLU's zeros) would
otherwise wait on each other's increment. They are int32 (half the cache footprint of int64:
measured 1.9 vs 3.6 ns per value) and flushed into the int64 counts every ``_FLUSH`` values."""

_FLUSH = 1 << 28
"""Values binned between flushes of the int32 lanes: a lane gets at most a quarter of them."""


F = TypeVar("F", bound=Callable[..., Any])


def _compiled(function: F) -> F:
    """``numba.njit(nogil=True)``, cached on disk where numba can write (the package's
    ``__pycache__``, ``~/.cache`` or ``NUMBA_CACHE_DIR``). A read-only install without a writable
    home has none: numba then refuses ``cache=True`` at decoration, so compile in memory (a few
    seconds once per process) rather than fail to import."""
    try:
        compiled = numba.njit(nogil=True, cache=True)(function)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        compiled = numba.njit(nogil=True)(function)
    return cast(F, compiled)


class FloatBits:
    """Bit layout of a float dtype: the mask dropping the sign, the exponent shift and bias."""

    def __init__(self, dtype: np.dtype[Any]) -> None:
        if dtype == np.float32:
            self.uint: type[np.unsignedinteger[Any]] = np.uint32
            self.mantissa_bits, self.bias = 23, 127
        elif dtype == np.float64:
            self.uint = np.uint64
            self.mantissa_bits, self.bias = 52, 1023
        else:
            raise TypeError(f"float32 or float64 values expected, got {dtype}")
        width = 8 * np.dtype(self.uint).itemsize
        self.abs_mask = self.uint((1 << (width - 1)) - 1)
        exponent_bits = width - 1 - self.mantissa_bits
        self.inf_bits = int(((1 << exponent_bits) - 1) << self.mantissa_bits)

    def is_finite(self, peak_bits: int) -> bool:
        """Whether an :func:`abs_peak_bits` result belongs to a tensor of finite values only."""
        return peak_bits < self.inf_bits

    def to_float(self, peak_bits: int) -> float:
        """The float whose bits are ``peak_bits``."""
        return float(np.array([peak_bits], dtype=self.uint).view(_FLOAT_OF[self.uint])[0])


_FLOAT_OF = {np.uint32: np.float32, np.uint64: np.float64}


def float_bits(
    values: npt.NDArray[np.floating],
) -> tuple[npt.NDArray[np.unsignedinteger], FloatBits]:
    """``values`` (1-D, contiguous) viewed as unsigned integers, with their layout."""
    layout = FloatBits(values.dtype)
    return values.view(layout.uint), layout


@_compiled
def _peak(bits: Any, mask: Any, start: int, stop: int) -> Any:
    peak = mask ^ mask  # a zero of the bits' type
    for i in range(start, stop):
        b = bits[i] & mask
        if b > peak:
            peak = b
    return peak


@_compiled
def abs_peak_bits(bits: Any, mask: Any) -> int:
    """The bits of max|x| over ``bits`` (a float array viewed as unsigned ints); 0 when empty."""
    return int(_peak(bits, mask, 0, bits.size))


@_compiled
def binned_histogram(values: Any, scale: Any, counts: Any) -> None:
    """Add ``min(floor(|x| * scale), B - 1)`` of every value to ``counts`` (``B`` bins, int64).

    ``scale`` should be of the values' float type (``np.float32(...)`` for float32 values), so the
    product is rounded as numpy rounds ``values * scale``. Values must be finite (check first with
    :func:`abs_peak_bits`).
    """
    lanes = np.zeros((_LANES, counts.size), dtype=np.int32)
    for start in range(0, values.size, _FLUSH):
        stop = min(start + _FLUSH, values.size)
        _bin_chunk(values, start, stop, scale, lanes)
        _fold_lanes_into(lanes, counts)
        lanes[:] = 0


@_compiled
def _bin_chunk(values: Any, start: int, stop: int, scale: Any, lanes: Any) -> None:
    """``lanes[k % LANES, min(floor(|values[k]| * scale), bins - 1)] += 1`` for k in [start, stop)."""
    top = lanes.shape[1] - 1
    quad = start + (stop - start) // _LANES * _LANES
    for i in range(start, quad, _LANES):
        lanes[0, min(int(abs(values[i]) * scale), top)] += 1
        lanes[1, min(int(abs(values[i + 1]) * scale), top)] += 1
        lanes[2, min(int(abs(values[i + 2]) * scale), top)] += 1
        lanes[3, min(int(abs(values[i + 3]) * scale), top)] += 1
    for i in range(quad, stop):
        lanes[0, min(int(abs(values[i]) * scale), top)] += 1


@_compiled
def numpy_histogram(
    values: Any,
    bits: Any,
    mask: Any,
    inf_bits: int,
    edges: Any,
    scale: Any,
    fast: Any,
    counts: Any,
) -> tuple[int, int]:
    """Add the ``numpy.histogram`` bin of every |x| over ``[0, edges[-1]]`` to ``counts`` (int64).

    ``edges`` are numpy's (``numpy.histogram_bin_edges(..., B, (0, top))``, ``B + 1`` floats of
    the dtype numpy bins in), ``scale`` is ``[top - 0, B]`` in the dtype numpy computes bin indices
    in (float64 with numpy 2) and ``fast`` is ``[B / top, guard]`` in float64
    (:func:`calibrators.histogram.numpy_bins` makes all three); ``values`` and ``bits`` are the same
    1-D memory as floats and as unsigned ints.

    numpy's binning, per value: ``i = int((|x| / (top - 0)) * B)``, ``B`` becomes ``B - 1``, then
    ``i -= 1`` where ``|x| < edges[i]`` and ``i += 1`` where ``|x| >= edges[i + 1]`` (except in the
    last bin, which is closed). Its first guess is within one bin of the bin ``c`` whose float edges
    hold the value (``edges[c] <= |x| < edges[c + 1]``; the guess errs by rounding only, far less
    than a bin), and from ``c - 1``, ``c`` or ``c + 1`` the two corrections land on ``c``: numpy's
    bin *is* ``c``. So a value whose position ``f = |x| * B / top`` lies further than ``guard``
    (in bins) from the nearest integer is in bin ``int(f)`` with no edge to compare: ``guard``
    bounds the rounding of ``f`` and of the float edges (``4 B`` units in the last place of the
    edges' dtype). Only the others, about ``2 guard`` of the values (0.05% for 2048 float32 bins),
    take numpy's exact path; the multiply-and-truncate path costs about 20% less than a division
    and two edge loads per value.

    numpy drops values above ``top``; here they count in the last bin (a second pass that sees a
    larger value than the first is the runtime's rounding, not data to lose). Returns
    ``(peak_bits, bad)``: the bits of max|x| and the index of the first chunk holding NaN or Inf
    (``-1`` when all are finite; nothing from that chunk on is counted).
    """
    lanes = np.zeros((_LANES, counts.size), dtype=np.int32)
    n = values.size
    since_flush = 0
    peak_all = mask ^ mask  # a zero of the bits' type
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        peak = _peak(bits, mask, start, stop)
        if peak >= inf_bits:
            _fold_lanes_into(lanes, counts)
            return int(peak_all), start
        if peak > peak_all:
            peak_all = peak
        _numpy_bin_chunk(values, start, stop, edges, scale, fast, lanes)
        since_flush += stop - start
        if since_flush >= _FLUSH:
            _fold_lanes_into(lanes, counts)
            lanes[:] = 0
            since_flush = 0
    _fold_lanes_into(lanes, counts)
    return int(peak_all), -1


@_compiled
def _numpy_bin_chunk(
    values: Any, start: int, stop: int, edges: Any, scale: Any, fast: Any, lanes: Any
) -> None:
    """``lanes[k % LANES, numpy's bin of |values[k]|] += 1`` for k in [start, stop)."""
    last = lanes.shape[1] - 1
    reciprocal = fast[0]
    guard = fast[1]
    upper = 1.0 - guard
    for i in range(start, stop):
        a = abs(values[i])
        f = a * reciprocal
        index = int(f)
        frac = f - index
        # bin 0 starts at exactly 0; the last bin is closed, and holds values above the range
        if not (index < last and frac < upper and (frac >= guard or index == 0)):
            index = _numpy_bin(a, edges, scale, last)
        lanes[i & (_LANES - 1), index] += 1


@_compiled
def _numpy_bin(a: Any, edges: Any, scale: Any, last: int) -> int:
    """numpy.histogram's bin of ``a >= 0``, computed as numpy does (see :func:`numpy_histogram`)."""
    if a >= edges[last + 1]:
        return last
    index = min(int((a / scale[0]) * scale[1]), last)  # in the scale's dtype, as numpy promotes
    if a < edges[index]:
        index -= 1
    if index != last and a >= edges[index + 1]:
        index += 1
    return index


@_compiled
def _fold_lanes_into(lanes: Any, counts: Any) -> None:
    for lane in range(lanes.shape[0]):
        for j in range(counts.size):
            counts[j] += lanes[lane, j]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def for_each_tensor(
    work: Callable[[str, npt.NDArray[Any]], None],
    tensors: Sequence[tuple[str, npt.NDArray[Any]]],
    workers: int,
) -> None:
    """``work(name, values)`` for every tensor, on up to ``workers`` threads, largest first.

    ``work`` must only touch the state of its own tensor (names are distinct within one batch) and
    spend its time in code that releases the GIL, like the kernels above. The first error raised
    is re-raised once every started call has finished.
    """
    if workers <= 1 or len(tensors) <= 1:
        for name, values in tensors:
            work(name, values)
        return
    ordered = sorted(tensors, key=lambda item: np.size(item[1]), reverse=True)
    with ThreadPoolExecutor(max_workers=min(workers, len(ordered))) as pool:
        futures = [pool.submit(work, name, values) for name, values in ordered]
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error
