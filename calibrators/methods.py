"""Calibration methods: from a |x| histogram to amax, the range quantized to +-127 (scale = amax/127).

``auto``        per tensor, the candidate below with the least error where it matters: at the
                output of the Conv/Gemm/MatMul nodes reading the tensor (measured on a few
                samples by :mod:`calibrators.auto`), else in the tensor itself. The default.
``entropy``     TensorRT's EntropyCalibration2 criterion (KL divergence), vectorized.
``minmax``      max|x| over the dataset.
``percentile``  the value below which ``percentile`` % of |x| falls (default 99.99).
``mse``         the amax minimizing the squared error of INT8 fake quantization (clip + round).

Presets (:func:`auto`, :func:`entropy`, :func:`minmax`, :func:`percentile`, :func:`mse`,
:func:`method_spec`)
validate their parameters and raise ``ValueError`` (pydantic's ``ValidationError``) when they are
out of range.

Degenerate histograms (nothing observed, all zeros, or every value in bin 0 so that the entropy
search has no mass left once bin 0 is replaced by bin 1) fall back to the histogram's range,
``max_abs``: 0 for an all-zero tensor (its table entry is then a zero scale) and never a range
that clips observed data.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from calibrators.histogram import Histogram
from calibrators.spec import DEFAULT_NUM_QUANT_BINS, DEFAULT_PERCENTILE

__all__ = [
    "entropy_amax",
    "entropy_bin",
    "entropy_divergences",
    "minmax_amax",
    "mse_amax",
    "percentile_amax",
]


_MSE_CHUNK = 128
"""Candidates evaluated at once by :func:`mse_amax` (bounds its scratch to ~2 MB)."""

_KL_TIE_NATS = 1e-12
"""Divergences this close to the minimum count as ties (see :func:`entropy_bin`)."""

Float64Array = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------------------------
# entropy (KL divergence), TensorRT EntropyCalibration2
#
# Counts b[0..N) after b[0] := b[1] (as NVIDIA's pytorch-quantization and Model Optimizer do: bin 0
# is swollen by exact zeros, e.g. after ReLU). Total T = sum b. For each candidate i (bins kept) in Q..N:
#   P_j = b_j for j < i - 1,  P_{i-1} = b_{i-1} + o_i  with the outliers o_i = sum_{j >= i} b_j;
#   level of bin j: l(j) = floor(j * Q / i) (the interval of linspace(0, i, Q + 1) holding j; for
#     Q = 128, a power of two, the edges k * i / Q are exact floats, so np.digitize agrees);
#   M_l = sum of b_j over the bins of level l, n_l = how many of those bins are non-empty;
#   Q_j = M_l / n_l for non-empty j, 0 for empty j (a level's mass spread over its non-empty bins).
# sum P = T and sum Q = S_i = sum_{j < i} b_j, so with p = P / T and q = Q / S_i
#   KL(p || q) = sum_j p_j log(p_j / q_j) = (A_i - X_i) / T + log(S_i / T),
#   A_i = sum_j P_j log P_j = C[i - 1] + P_{i-1} log P_{i-1},   C[k] = sum_{j < k} b_j log b_j,
#   X_i = sum_j P_j log Q_j = sum_l M_l log(M_l / n_l) + o_i log(M_{Q-1} / n_{Q-1}),
# because every non-empty bin of level l carries log Q_j = log(M_l / n_l), empty bins carry no P
# except bin i - 1 (which holds the outliers and is always in the last level). If o_i > 0 while
# b_{i-1} = 0, P has mass where Q has none: KL = inf, as scipy.stats.entropy says too.
# Level l covers bins [s_l, s_{l+1}) with s_l = ceil(l * i / Q), so with prefix sums
# B[k] = sum_{j < k} b_j and Z[k] = #{j < k : b_j > 0} we get M_l = B[s_{l+1}] - B[s_l] and
# n_l = Z[s_{l+1}] - Z[s_l] for all levels and all candidates at once: two gathers on a
# (Q + 1) x (N - Q + 1) index array, no Python loop over candidates.


@functools.lru_cache(maxsize=8)
def _level_starts(nbins: int, levels: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """Candidates ``i`` and the first bin ``s_l = ceil(l * i / levels)`` of each level (read-only)."""
    cand = np.arange(levels, nbins + 1, dtype=np.int64)
    level = np.arange(levels + 1, dtype=np.int64)[:, None]
    starts = ((level * cand[None, :] + (levels - 1)) // levels).astype(np.intp)
    cand.setflags(write=False)
    starts.setflags(write=False)
    return cand, starts


@functools.lru_cache(maxsize=8)
def _log_table(nbins: int) -> Float64Array:
    """``log(k)`` for ``k`` in ``0..nbins`` (``log(0)`` stored as 0: empty levels are masked)."""
    table = np.log(np.maximum(np.arange(nbins + 1, dtype=np.float64), 1.0))
    table.setflags(write=False)
    return table


def _entropy_counts(hist: Histogram) -> Float64Array:
    counts = np.array(hist.counts, dtype=np.float64)
    counts[0] = counts[1]
    return counts


def entropy_divergences(
    hist: Histogram, num_quant_bins: int = DEFAULT_NUM_QUANT_BINS
) -> tuple[npt.NDArray[np.int64], Float64Array]:
    """KL(P || Q) for every candidate number of kept bins ``i`` in ``num_quant_bins..num_bins``.

    Returns ``(candidates, divergences)``; a divergence is ``inf`` where Q is empty where P is not.
    Raises ``ValueError`` when the histogram has fewer bins than ``num_quant_bins`` or no mass
    left once bin 0 is replaced by bin 1 (see :func:`entropy_bin` for the fallback).
    """
    levels = num_quant_bins
    nbins = hist.num_bins
    if nbins < levels or levels < 1:
        raise ValueError(f"entropy needs at least {levels} bins, the histogram has {nbins}.")
    b = _entropy_counts(hist)
    mass_before = np.concatenate(([0.0], np.cumsum(b)))  # B[k]
    total = float(mass_before[-1])
    if not total > 0.0:
        raise ValueError("entropy needs a histogram with mass outside bin 0.")
    nonempty_before = np.concatenate(([0], np.cumsum(b > 0)))  # Z[k]
    blogb = np.zeros_like(b)
    np.multiply(b, np.log(b, where=b > 0, out=np.zeros_like(b)), out=blogb)
    plogp_before = np.concatenate(([0.0], np.cumsum(blogb)))  # C[k]

    cand, starts = _level_starts(nbins, levels)
    at_starts = mass_before[starts]
    mass = at_starts[1:] - at_starts[:-1]  # M_l per level (rows) and candidate (columns)
    at_starts_nz = nonempty_before[starts]
    filled = at_starts_nz[1:] - at_starts_nz[:-1]  # n_l
    ok = (filled > 0) & (mass > 0)
    level_q = np.log(mass, where=ok, out=np.zeros_like(mass))
    level_q -= _log_table(nbins)[filled]  # log(M_l / n_l) where ok, unused elsewhere
    cross = np.einsum("lc,lc->c", np.where(ok, mass, 0.0), level_q)

    kept = mass_before[cand]  # S_i
    outliers = total - kept  # exactly 0 once every later bin is empty
    last_p = total - mass_before[cand - 1]  # b_{i-1} + o_i
    plogp = plogp_before[cand - 1] + last_p * np.log(np.where(last_p > 0, last_p, 1.0))
    has_out = outliers > 0
    cross = cross + np.where(has_out, outliers * level_q[-1], 0.0)
    with np.errstate(divide="ignore"):
        kl = (plogp - cross) / total + np.log(kept / total)
    impossible = (has_out & (b[cand - 1] == 0)) | (kept <= 0) | np.isnan(kl)
    kl[impossible] = np.inf
    return cand, kl


def entropy_bin(hist: Histogram, num_quant_bins: int = DEFAULT_NUM_QUANT_BINS) -> int:
    """i*: the number of kept bins minimizing KL(P || Q) (the last one on ties).

    Degenerate histograms (``max_abs == 0``, or no mass outside bin 0) give ``num_bins``.
    """
    if hist.max_abs == 0.0 or hist.num_bins < 2 or not float(hist.counts[1:].sum()) > 0.0:
        return hist.num_bins
    cand, kl = entropy_divergences(hist, num_quant_bins)
    # "Last on ties" must survive float noise: the prefix-sum form and a per-candidate sum differ
    # by ~1e-14 nats, so exact ties (e.g. Q == P for every candidate) would otherwise be decided
    # by rounding. On the real activations measured (Fashion-MNIST CNN, both histogram modes) best
    # and runner-up were at least 1e-6 nats apart, far above this tolerance.
    ties = np.flatnonzero(kl <= kl.min() + _KL_TIE_NATS)
    return int(cand[ties[-1]])


def entropy_amax(hist: Histogram, num_quant_bins: int = DEFAULT_NUM_QUANT_BINS) -> float:
    """TensorRT EntropyCalibration2's amax: ``(i* + 0.5) * bin_width``, the centre of bin i*.

    That is what TensorRT's caches hold (an even spread over [0, 1] gives 2048.5 / 2048, half a
    bin past the max); Model Optimizer's ``_compute_amax_entropy`` returns the edge ``i* * width``.

    Degenerate histograms give ``max_abs`` (see the module docstring).
    """
    if hist.max_abs == 0.0 or not float(hist.counts[1:].sum()) > 0.0:
        return hist.max_abs
    return (entropy_bin(hist, num_quant_bins) + 0.5) * hist.bin_width


# ---------------------------------------------------------------------------------------------
# minmax, percentile, mse


def minmax_amax(hist: Histogram) -> float:
    """max|x|: the histogram's range (in tensorrt mode, the possibly doubled range)."""
    return hist.max_abs


def percentile_amax(hist: Histogram, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The value below which ``percentile`` % of |x| falls, interpolated linearly within its bin."""
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}.")
    cumulative = np.cumsum(hist.counts, dtype=np.float64)
    total = float(cumulative[-1])
    if hist.max_abs == 0.0 or not total > 0.0:
        return hist.max_abs
    target = total * (percentile / 100.0)
    k = int(np.searchsorted(cumulative, target, side="left"))
    if k >= hist.num_bins:
        return hist.max_abs
    before = float(cumulative[k - 1]) if k > 0 else 0.0
    within = (target - before) / float(hist.counts[k])
    return min((k + min(within, 1.0)) * hist.bin_width, hist.max_abs)


def mse_problem(
    hist: Histogram, num_quant_bins: int
) -> tuple[Float64Array, Float64Array, Float64Array, int] | None:
    """The MSE search's inputs in bin units (width 1: the argmin does not depend on it): the
    non-empty bins' centres and counts, the candidate amaxes (``num_quant_bins`` .. all bins) and
    ``qmax``; None for a degenerate histogram (all zeros), whose answer is ``max_abs``."""
    qmax = num_quant_bins - 1
    if qmax < 1:
        raise ValueError(f"num_quant_bins must be >= 2, got {num_quant_bins}.")
    counts = np.asarray(hist.counts, dtype=np.float64)
    if hist.max_abs == 0.0 or not float(counts.sum()) > 0.0:
        return None
    nonempty = np.flatnonzero(counts)
    cand = np.arange(min(num_quant_bins, hist.num_bins), hist.num_bins + 1, dtype=np.float64)
    centres: Float64Array = nonempty.astype(np.float64) + 0.5
    return centres, counts[nonempty], cand, qmax


def mse_amax(hist: Histogram, num_quant_bins: int = DEFAULT_NUM_QUANT_BINS) -> float:
    """The amax minimizing the expected squared error of symmetric INT8 fake quantization.

    Each bin's count sits at its centre; a candidate amax ``a`` (the bin edges ``i * width`` for
    ``i`` in ``num_quant_bins..num_bins``) quantizes x to ``min(round(x / s), qmax) * s`` with
    ``qmax = num_quant_bins - 1`` and ``s = a / qmax``, so the error holds both rounding (below
    ``a``) and clipping (above). All candidates are evaluated, in chunks; the smallest amax wins
    ties. Degenerate histograms give ``max_abs``.
    """
    problem = mse_problem(hist, num_quant_bins)
    if problem is None:
        return hist.max_abs
    centres, weights, cand, qmax = problem
    errors = np.empty(cand.size, dtype=np.float64)
    for start in range(0, cand.size, _MSE_CHUNK):
        amax = cand[start : start + _MSE_CHUNK, None]
        step = amax / qmax
        levels = np.minimum(np.floor(centres[None, :] / step + 0.5), qmax)
        diff = centres[None, :] - levels * step
        errors[start : start + _MSE_CHUNK] = (diff * diff) @ weights
    return float(cand[int(np.argmin(errors))]) * hist.bin_width


# ---------------------------------------------------------------------------------------------
# MethodSpec and presets
