"""Compiled inner loops of activation statistics (numba): one pass over a tensor's memory.

A CNN's activations are tens of millions of values per sample, far beyond the caches, so what a
statistic costs is mostly how many times it walks them. numpy needs several passes and scratch
arrays per statistic (abs, max, multiply, bincount); these kernels read each value once and
release the GIL, so :class:`calibrators.histogram.HistogramCollector` can bin several tensors on
several cores at the same time.

Both kernels work on the IEEE-754 bits (``values.view(uint32)`` for float32, ``uint64`` for
float64): ``bits & ~sign`` orders non-negative floats like the floats themselves, so max|x| is an
integer max that vectorizes without fast-math, and a result at or above the infinity pattern
means the tensor holds NaN or Inf. The exponent field of max|x| gives the smallest power of two
strictly above it, which is all the exact histogram needs to choose its range.
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
    "fine_histogram",
    "float_bits",
    "for_each_tensor",
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

    def log2_range_above(self, peak_bits: int) -> int:
        """The exponent ``e`` of the smallest power of two strictly above the float ``peak_bits``.

        A normal float with exponent field ``E`` lies in ``[2**(E - bias), 2**(E - bias + 1))``;
        subnormals (``E == 0``) lie below ``2**(1 - bias)``.
        """
        field = max(peak_bits >> self.mantissa_bits, 1)
        return field - self.bias + 1


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
def fine_histogram(
    values: Any,
    bits: Any,
    mask: Any,
    inf_bits: int,
    mantissa_bits: int,
    bias: int,
    log2_range: int,
    min_log2_range: int,
    counts: Any,
) -> tuple[int, int, int]:
    """Add ``floor(|x| * F / 2**log2_range)`` of every value to ``counts`` (``F`` bins, int64).

    ``values`` and ``bits`` are the same 1-D memory as floats and as unsigned ints. Chunk by chunk,
    the chunk's max|x| comes first; when it reaches ``2**log2_range`` the range grows to the next
    power of two above it and ``counts`` fold (adjacent bins summed ``2**steps`` at a time, exact).
    Returns ``(peak_bits, log2_range, bad)``: the bits of max|x|, the final range exponent, and the
    index of the first chunk holding NaN or Inf (``-1`` when all are finite; nothing of that chunk
    or later is counted).
    """
    fine = counts.size
    fine_log2 = 0
    while (1 << fine_log2) < fine:
        fine_log2 += 1
    lanes = np.zeros((_LANES, fine), dtype=np.int32)
    n = values.size
    since_flush = 0
    peak_all = mask ^ mask
    typed_scale = np.empty_like(values[:1])  # the scale in the values' own float type
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        peak = _peak(bits, mask, start, stop)
        if peak >= inf_bits:
            _fold_lanes_into(lanes, counts)
            return int(peak_all), log2_range, start
        if peak > peak_all:
            peak_all = peak
        # the sign is masked off, so the bits fit an int64 (numba mixes uint64 and int64 as floats)
        exponent_field = max(int(np.int64(peak) >> np.int64(mantissa_bits)), 1)
        needed = max(exponent_field - bias + 1, min_log2_range)
        if needed > log2_range:
            steps = needed - log2_range
            for lane in range(_LANES):
                _fold(lanes[lane], steps)
            _fold(counts, steps)
            log2_range = needed
        typed_scale[0] = 2.0 ** (fine_log2 - log2_range)
        _bin_chunk(values, start, stop, typed_scale[0], lanes)
        since_flush += stop - start
        if since_flush >= _FLUSH:
            _fold_lanes_into(lanes, counts)
            lanes[:] = 0
            since_flush = 0
    _fold_lanes_into(lanes, counts)
    return int(peak_all), log2_range, -1


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
def _fold(counts: Any, steps: int) -> None:
    """Double the range of a power-of-two histogram ``steps`` times, summing adjacent bins."""
    fine = counts.size
    if steps <= 0:
        return
    if (1 << min(steps, 62)) >= fine:
        total = counts.sum()
        counts[:] = 0
        counts[0] = total
        return
    group = 1 << steps
    kept = fine // group
    for j in range(kept):
        acc = 0
        for k in range(j * group, (j + 1) * group):
            acc += counts[k]
        counts[j] = acc
    counts[kept:] = 0


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
