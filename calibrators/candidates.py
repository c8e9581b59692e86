"""``auto``'s candidate ranges for a tensor, and the tensor's own quantization error, from its
histogram.

Candidates (:func:`auto_candidates`): the single methods' ranges, ``entropy``, ``minmax``,
``percentile:99.9``, ``percentile:99.99``, ``percentile:99.999`` and ``mse``, the last searched
coarse to fine (:func:`mse_amax_coarse_to_fine`) because the full search of
:func:`calibrators.methods.mse_amax` costs more than the whole entropy method on some models.
:func:`quantization_error` judges a range by the tensor's own error; :mod:`calibrators.auto`
judges it at the outputs of the nodes that read the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from calibrators.histogram import Histogram
from calibrators.methods import entropy_amax, minmax_amax, mse_problem, percentile_amax
from calibrators.spec import DEFAULT_NUM_QUANT_BINS

__all__ = [
    "AUTO_PERCENTILES",
    "auto_candidates",
    "choose_by_tensor_error",
    "mse_amax_coarse_to_fine",
    "quantization_error",
    "quantization_errors",
]

AUTO_PERCENTILES = (99.9, 99.99, 99.999)
"""The percentiles among ``auto``'s candidates."""

_ERROR_SUBPOINTS = 8
"""Points per bin at which :func:`quantization_error` evaluates the quantizer."""

_MSE_STRIDE = 16
_MSE_REFINE = 4
"""Coarse step and number of refined neighbourhoods of :func:`mse_amax_coarse_to_fine`."""

Float64Array = npt.NDArray[np.float64]


def auto_candidates(
    hist: Histogram, num_quant_bins: int = DEFAULT_NUM_QUANT_BINS
) -> dict[str, float]:
    """``auto``'s candidate ranges for ``hist``, by label: ``entropy``, ``minmax``,
    ``percentile:99.9``, ``percentile:99.99``, ``percentile:99.999`` and ``mse`` (the last
    searched coarse to fine, :func:`mse_amax_coarse_to_fine`: the full search costs more than
    the whole entropy method on some models)."""
    candidates = {
        "entropy": entropy_amax(hist, num_quant_bins),
        "minmax": minmax_amax(hist),
    }
    for p in AUTO_PERCENTILES:
        candidates[f"percentile:{p}"] = percentile_amax(hist, p)
    candidates["mse"] = mse_amax_coarse_to_fine(hist, num_quant_bins)
    return candidates


def quantization_error(
    hist: Histogram, amax: float, num_quant_bins: int = DEFAULT_NUM_QUANT_BINS
) -> float:
    """The squared error of per-tensor INT8 fake quantization with range ``amax``, relative to the
    tensor's energy: ``sum (x - Q(x))^2 / sum x^2`` (1 / SQNR), estimated from the histogram.

    ``Q(x) = min(round(|x| / s), qmax) * s`` with ``s = float32(amax / qmax)`` and
    ``qmax = num_quant_bins - 1``. Within a bin the values are taken as spread evenly (evaluated
    at 8 points per bin): a bin's centre alone would misjudge the rounding error of a range whose
    step is finer than the bins (a low percentile of a spiky tensor). 0 for an all-zero tensor.
    """
    return float(quantization_errors(hist, [amax], num_quant_bins)[0])


def quantization_errors(
    hist: Histogram, amaxes: Sequence[float], num_quant_bins: int = DEFAULT_NUM_QUANT_BINS
) -> Float64Array:
    """:func:`quantization_error` for several ranges at once."""
    counts = np.asarray(hist.counts, dtype=np.float64)
    nonempty = np.flatnonzero(counts)
    out = np.zeros(len(amaxes), dtype=np.float64)
    if hist.max_abs == 0.0 or nonempty.size == 0:
        return out
    offsets = (np.arange(_ERROR_SUBPOINTS) + 0.5) / _ERROR_SUBPOINTS
    points = ((nonempty[:, None] + offsets[None, :]) * hist.bin_width).reshape(-1)
    weights = np.repeat(counts[nonempty] / _ERROR_SUBPOINTS, _ERROR_SUBPOINTS)
    energy = float(weights @ (points * points))
    if not energy > 0.0:
        return out
    qmax = num_quant_bins - 1
    steps = np.asarray(amaxes, dtype=np.float64) / qmax
    steps = steps.astype(np.float32).astype(np.float64)[:, None]
    live = steps[:, 0] > 0.0
    out[~live] = 1.0  # everything quantizes to 0
    if np.any(live):
        step = steps[live]
        levels = np.minimum(np.rint(points[None, :] / step), qmax)
        diff = points[None, :] - levels * step
        out[live] = ((diff * diff) @ weights) / energy
    return out


def choose_by_tensor_error(
    hist: Histogram, candidates: dict[str, float], num_quant_bins: int = DEFAULT_NUM_QUANT_BINS
) -> tuple[str, dict[str, float]]:
    """The candidate with the least :func:`quantization_error` (the first listed on ties), and
    every candidate's error."""
    values = quantization_errors(hist, list(candidates.values()), num_quant_bins)
    errors = dict(zip(candidates, values.tolist(), strict=True))
    return min(errors, key=errors.__getitem__), errors


def _mse_errors(
    centres: npt.NDArray[np.floating], weights: Float64Array, amaxes: Float64Array, qmax: int
) -> Float64Array:
    """Squared error of each candidate ``amaxes`` (bin units) over bins at ``centres``, with the
    very arithmetic of :func:`calibrators.methods.mse_amax` (so the same value per candidate)."""
    step = amaxes[:, None] / qmax
    levels = np.minimum(np.floor(centres[None, :] / step + 0.5), qmax)
    diff = centres[None, :] - levels * step
    result: Float64Array = (diff * diff) @ weights
    return result


def mse_amax_coarse_to_fine(hist: Histogram, num_quant_bins: int = DEFAULT_NUM_QUANT_BINS) -> float:
    """:func:`calibrators.methods.mse_amax`'s criterion over its candidates, searched coarse to
    fine: every 16th candidate, then every candidate within 16 of the 4 best (a tenth of the work).

    The error is a smooth trend (clipping against rounding) under a small ripple (where the edges
    of the levels fall among the bins), so the global minimum sits next to one of the best
    coarse points unless the curve is nearly flat: on real activations (PP-OCRv4 recognizer,
    EfficientNet-Lite0, the orientation classifier) it returned ``mse_amax``'s value for all
    but 1 of 726 tensors, and that one within 1 %. ``auto``'s ``mse`` candidate.
    """
    problem = mse_problem(hist, num_quant_bins)
    if problem is None:
        return hist.max_abs
    centres, weights, cand, qmax = problem
    coarse = np.unique(np.append(np.arange(0, cand.size, _MSE_STRIDE), cand.size - 1))
    coarse_errors = _mse_errors(centres, weights, cand[coarse], qmax)
    best = coarse[np.argsort(coarse_errors, kind="stable")[:_MSE_REFINE]]
    near = (best[:, None] + np.arange(-_MSE_STRIDE, _MSE_STRIDE + 1)[None, :]).reshape(-1)
    fine = np.unique(near[(near >= 0) & (near < cand.size)])
    fine_errors = _mse_errors(centres, weights, cand[fine], qmax)
    return float(cand[fine[int(np.argmin(fine_errors))]]) * hist.bin_width
