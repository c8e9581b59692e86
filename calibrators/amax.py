"""From a histogram to amax with a :class:`~calibrators.spec.MethodSpec`: one function per method.

A new method is a :class:`~calibrators.spec.CalibrationMethod` member, its parameters in
``calibrators.spec._PARAMETERS``, its function in :mod:`calibrators.methods` and one line here.
"""

from __future__ import annotations

from collections.abc import Callable

from calibrators.candidates import auto_candidates, choose_by_tensor_error
from calibrators.histogram import Histogram
from calibrators.methods import entropy_amax, minmax_amax, mse_amax, percentile_amax
from calibrators.spec import DEFAULT_PERCENTILE, CalibrationMethod, MethodSpec

__all__ = ["compute_amax"]


def _auto(spec: MethodSpec, hist: Histogram) -> float:
    candidates = auto_candidates(hist, spec.num_quant_bins)
    label, _ = choose_by_tensor_error(hist, candidates, spec.num_quant_bins)
    return candidates[label]


_AMAX: dict[CalibrationMethod, Callable[[MethodSpec, Histogram], float]] = {
    CalibrationMethod.AUTO: _auto,
    CalibrationMethod.ENTROPY: lambda spec, hist: entropy_amax(hist, spec.num_quant_bins),
    CalibrationMethod.MINMAX: lambda spec, hist: minmax_amax(hist),
    CalibrationMethod.PERCENTILE: lambda spec, hist: percentile_amax(
        hist, spec.percentile if spec.percentile is not None else DEFAULT_PERCENTILE
    ),
    CalibrationMethod.MSE: lambda spec, hist: mse_amax(hist, spec.num_quant_bins),
}


def compute_amax(spec: MethodSpec, hist: Histogram) -> float:
    """amax for ``hist`` with ``spec`` (``>= 0``; 0 only for an all-zero tensor).

    ``auto`` from a histogram alone is the candidate with the least error in the tensor itself
    (:func:`calibrators.candidates.choose_by_tensor_error`); ``calibrate`` does better where the
    tensor feeds a Conv, Gemm or MatMul (see :mod:`calibrators.auto`).
    """
    return _AMAX[spec.method](spec, hist)
