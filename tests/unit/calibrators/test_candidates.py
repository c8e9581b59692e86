"""auto's candidates (the single methods' ranges, mse searched coarse to fine) and the tensor's own
quantization error from its histogram."""

from __future__ import annotations

import numpy as np
import pytest

from calibrators.candidates import (
    AUTO_PERCENTILES,
    auto_candidates,
    choose_by_tensor_error,
    mse_amax_coarse_to_fine,
    quantization_error,
)
from calibrators.histogram import Histogram
from calibrators.methods import entropy_amax, mse_amax, percentile_amax
from calibrators.spec import HistogramMode
from calibrators.weights import fake_quantize
from tests.unit.calibrators.test_methods import histogram_of, real_histograms


def _direct_error(values: np.ndarray, amax: float) -> float:
    """1 / SQNR of per-tensor fake quantization, on the samples themselves."""
    diff = values.astype(np.float64) - fake_quantize(values, amax).astype(np.float64)
    return float(np.sum(diff * diff) / np.sum(values.astype(np.float64) ** 2))


def test_auto_candidates_are_the_single_methods() -> None:
    values = np.abs(np.random.default_rng(5).standard_t(3, 200_000)).astype(np.float32)
    hist = histogram_of(values)
    candidates = auto_candidates(hist)
    assert list(candidates) == [
        "entropy",
        "minmax",
        *(f"percentile:{p}" for p in AUTO_PERCENTILES),
        "mse",
    ]
    assert candidates["entropy"] == entropy_amax(hist)
    assert candidates["minmax"] == hist.max_abs
    assert candidates["percentile:99.99"] == percentile_amax(hist, 99.99)
    assert candidates["mse"] == mse_amax(hist)  # coarse to fine, same answer here


@pytest.mark.parametrize("fraction", [0.002, 0.03, 0.2, 1.0])
def test_quantization_error_matches_fake_quantizing_the_samples(fraction: float) -> None:
    # a spiky tensor: most values near 0, a long tail; fraction 0.002 makes the step finer than
    # a histogram bin, where evaluating bins at their centres only would be far off
    rng = np.random.default_rng(6)
    values = np.abs(rng.standard_t(2, 400_000) * 0.05).astype(np.float32)
    hist = histogram_of(values)
    amax = fraction * hist.max_abs
    assert quantization_error(hist, amax) == pytest.approx(_direct_error(values, amax), rel=0.03)


def test_quantization_error_degenerate_cases() -> None:
    empty = Histogram(counts=np.zeros(2048), max_abs=0.0)
    assert quantization_error(empty, 1.0) == 0.0
    hist = histogram_of(np.linspace(0.0, 1.0, 1000, dtype=np.float32))
    assert quantization_error(hist, 0.0) == 1.0


def test_choose_by_tensor_error_picks_the_least_error_and_auto_uses_it() -> None:
    values = np.abs(np.random.default_rng(7).standard_t(2, 300_000)).astype(np.float32)
    hist = histogram_of(values)
    candidates = auto_candidates(hist)
    label, errors = choose_by_tensor_error(hist, candidates)
    assert set(errors) == set(candidates)
    assert errors[label] == min(errors.values())
    assert label != "minmax"  # a long tail: the full range wastes the levels
    direct = {name: _direct_error(values, amax) for name, amax in candidates.items()}
    assert min(direct, key=direct.__getitem__) == label


@pytest.mark.parametrize("mode", list(HistogramMode))
def test_coarse_to_fine_mse_finds_the_full_search_on_real_activations(mode: HistogramMode) -> None:
    hists = real_histograms(mode)
    same = [mse_amax_coarse_to_fine(h) == mse_amax(h) for h in hists.values()]
    assert all(same)


def test_coarse_to_fine_mse_on_synthetic_spreads() -> None:
    rng = np.random.default_rng(8)
    spreads = [
        rng.standard_normal(100_000),
        rng.standard_t(3, 100_000),
        rng.laplace(size=100_000),
        np.concatenate([rng.standard_normal(100_000) * 0.01, rng.standard_normal(50) * 5]),
        rng.uniform(size=100_000),
    ]
    for values in spreads:
        hist = histogram_of(np.abs(values).astype(np.float32))
        assert mse_amax_coarse_to_fine(hist) == mse_amax(hist)
    empty = Histogram(counts=np.zeros(2048), max_abs=0.0)
    assert mse_amax_coarse_to_fine(empty) == 0.0
    with pytest.raises(ValueError, match="num_quant_bins"):
        mse_amax_coarse_to_fine(empty, num_quant_bins=1)
