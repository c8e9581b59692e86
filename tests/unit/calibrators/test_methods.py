"""Calibration methods: entropy (TensorRT EntropyCalibration2), minmax, percentile, mse; presets."""

from __future__ import annotations

import importlib.util
import struct
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
from scipy.stats import entropy as scipy_entropy

from calibrators.amax import compute_amax
from calibrators.candidates import auto_candidates, choose_by_tensor_error
from calibrators.histogram import Histogram, histograms_of
from calibrators.methods import (
    entropy_amax,
    entropy_bin,
    entropy_divergences,
    minmax_amax,
    mse_amax,
    percentile_amax,
)
from calibrators.spec import (
    CalibrationMethod,
    HistogramMode,
    MethodSpec,
    auto,
    entropy,
    method_spec,
    minmax,
    mse,
    percentile,
)
from tests.unit.calibrators.test_histogram import cnn_activations


def scale_hex(amax: float) -> str:
    """The float32 bits of scale = amax / 127, as a TensorRT cache writes them."""
    return struct.pack(">f", np.float32(amax / 127)).hex()


def histogram_of(values: np.ndarray, mode: HistogramMode = HistogramMode.EXACT) -> Histogram:
    return histograms_of([{"t": values}], mode)["t"]


def real_histograms(
    mode: HistogramMode, samples: int = 256, batch: int = 32
) -> dict[str, Histogram]:
    """Histograms of the small CNN's activations on its Fashion-MNIST-like images."""
    acts = cnn_activations(samples)
    batches = [
        {name: values[start : start + batch] for name, values in acts.items()}
        for start in range(0, samples, batch)
    ]
    return histograms_of(batches, mode)


def direct_divergences(counts: np.ndarray, levels: int = 128) -> np.ndarray:
    """KL(P || Q) per candidate, written out the slow way from the definition (the oracle)."""
    bins = np.array(counts, dtype=np.float64)
    bins[0] = bins[1]
    out = []
    for i in range(levels, bins.size + 1):
        edges = np.linspace(0, i, levels + 1)
        level = np.digitize(np.arange(i), edges) - 1
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        nonempty = bins[:i] > 0
        mass = np.bincount(level, weights=bins[:i], minlength=levels)
        filled = np.bincount(level, weights=nonempty, minlength=levels)
        q = np.where(nonempty, mass[level] / np.maximum(filled[level], 1), 0.0)
        out.append(scipy_entropy(p, q) if q.sum() > 0 else np.inf)
    return np.array(out)


# --------------------------------------------------------------------------------------------
# entropy


def test_entropy_of_an_even_spread_over_0_1_is_the_bin_centre_past_the_max() -> None:
    values = np.linspace(0.0, 1.0, 2048 * 50 + 1, dtype=np.float32)
    hist = histogram_of(values)
    assert hist.max_abs == 1.0
    assert entropy_bin(hist) == 2048
    assert entropy_amax(hist) == 2048.5 / 2048
    assert scale_hex(entropy_amax(hist)) == "3c010a14"
    uniform = Histogram(counts=np.full(2048, 7), max_abs=1.0)
    assert scale_hex(compute_amax(entropy(), uniform)) == "3c010a14"


def test_minmax_of_max_one_gives_tensorrt_scale() -> None:
    hist = histogram_of(np.array([0.25, -1.0, 0.5], np.float32))
    assert minmax_amax(hist) == 1.0
    assert scale_hex(compute_amax(minmax(), hist)) == "3c010204"


@pytest.mark.parametrize("mode", list(HistogramMode))
def test_vectorized_divergences_equal_the_definition_on_real_activations(
    mode: HistogramMode,
) -> None:
    hists = real_histograms(mode)
    for name in ("r1", "logits"):
        cand, ours = entropy_divergences(hists[name])
        oracle = direct_divergences(np.asarray(hists[name].counts))
        assert cand[0] == 128 and cand[-1] == 2048 and cand.size == oracle.size
        assert np.array_equal(np.isinf(ours), np.isinf(oracle))
        finite = np.isfinite(oracle)
        np.testing.assert_allclose(ours[finite], oracle[finite], rtol=0, atol=1e-12)
        assert entropy_bin(hists[name]) == cand[oracle.size - 1 - np.argmin(oracle[::-1])]


def test_divergence_is_infinite_when_the_outliers_land_in_an_empty_bin() -> None:
    counts = np.zeros(2048, np.int64)
    counts[:100] = 50
    counts[1500] = 3  # candidates 101..1500 put these outliers into an empty bin i - 1
    counts[-1] = 1
    hist = Histogram(counts=counts, max_abs=2.0)
    cand, ours = entropy_divergences(hist)
    oracle = direct_divergences(counts)
    assert np.array_equal(np.isinf(ours), np.isinf(oracle))
    # Bins 100..1499 and 1501..2046 are empty: only i = 1501 and i = 2048 keep the outliers in a
    # non-empty bin i - 1.
    assert set(cand[np.isfinite(ours)].tolist()) == {1501, 2048}
    finite = np.isfinite(oracle)
    np.testing.assert_allclose(ours[finite], oracle[finite], rtol=0, atol=1e-12)


def test_entropy_takes_the_last_candidate_on_ties() -> None:
    # Non-empty bins 16 apart: every level of every candidate holds at most one of them, so
    # Q == P and KL == 0 for all candidates 128..2048 (up to float noise): the last one wins.
    counts = np.zeros(2048, np.int64)
    counts[1:64:16] = [5, 9, 2, 7]
    hist = Histogram(counts=counts, max_abs=3.0)
    _, kl = entropy_divergences(hist)
    assert np.all(np.abs(kl) < 1e-12)
    assert entropy_bin(hist) == 2048
    assert entropy_amax(hist) == pytest.approx(2048.5 * 3.0 / 2048)


def test_entropy_replaces_bin_0_by_bin_1() -> None:
    # A ReLU-like histogram: a huge spike of zeros must not change the result.
    rng = np.random.default_rng(0)
    body = np.abs(rng.standard_t(4, 200_000)).astype(np.float32)
    with_zeros = np.concatenate([body, np.zeros(1_000_000, np.float32)])
    assert entropy_bin(histogram_of(with_zeros)) == entropy_bin(histogram_of(body))


def test_entropy_clips_a_long_tail() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 1.0, 200_000).astype(np.float32)
    values[:3] = 40.0  # three outliers stretch the range 8x
    hist = histogram_of(values)
    assert entropy_amax(hist) < 8.0 < hist.max_abs


def test_entropy_degenerate_histograms() -> None:
    zeros = histogram_of(np.zeros(10, np.float32))
    assert entropy_amax(zeros) == 0.0 and scale_hex(entropy_amax(zeros)) == "00000000"
    only_bin0 = Histogram(counts=np.eye(1, 2048, 0, dtype=np.int64)[0] * 9, max_abs=5.0)
    assert entropy_amax(only_bin0) == 5.0  # nothing left after bin 0 := bin 1: the full range
    assert entropy_bin(only_bin0) == 2048
    with pytest.raises(ValueError, match="at least 128 bins"):
        entropy_divergences(Histogram(counts=np.ones(64), max_abs=1.0))


# --------------------------------------------------------------------------------------------
# NVIDIA Model Optimizer's _compute_amax_entropy on identical histograms


@pytest.fixture(scope="module")
def modelopt_histogram() -> Iterator[types.ModuleType]:
    """modelopt.torch.quantization.calib.histogram, loaded alone.

    Importing it through its package pulls modelopt.torch's __init__ (requests, pulp, ...), which
    `pip install --no-deps nvidia-modelopt` leaves out. So this loads the single file, with stub
    modules standing in only for its unrelated imports (distributed helpers, quantized nn modules,
    fake-quant kernels, the calibrator base class); `_compute_amax_entropy` itself only uses numpy,
    scipy.stats.entropy and torch.tensor. The stubs live in sys.modules only while loading.
    """
    spec = importlib.util.find_spec("modelopt")
    assert spec is not None and spec.submodule_search_locations, (
        "pip install --no-deps nvidia-modelopt"
    )
    path = (
        Path(next(iter(spec.submodule_search_locations))) / "torch/quantization/calib/histogram.py"
    )
    package = "_trtforge_modelopt_stub"

    class _Calibrator:
        def __init__(self, num_bits: int = 8, axis: Any = None, unsigned: bool = False) -> None:
            pass

    stubs = {
        "modelopt": {},
        "modelopt.torch": {},
        "modelopt.torch.utils": {},
        "modelopt.torch.utils.distributed": {"is_initialized": lambda: False},
        package: {},
        f"{package}.nn": {},
        f"{package}.utils": {},
        f"{package}.tensor_quant": {"fake_tensor_quant": None, "scaled_e4m3": None},
        f"{package}.calib": {},
        f"{package}.calib.calibrator": {"_Calibrator": _Calibrator},
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, attrs in stubs.items():
            module = types.ModuleType(name)
            module.__path__ = []  # a package, so `from .. import nn` resolves
            module.__dict__.update(attrs)
            patch.setitem(sys.modules, name, module)
        file_spec = importlib.util.spec_from_file_location(f"{package}.calib.histogram", path)
        assert file_spec is not None and file_spec.loader is not None
        loaded = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(loaded)
    yield loaded


@pytest.mark.slow
def test_entropy_bin_matches_modelopt_on_real_activations(
    modelopt_histogram: types.ModuleType,
) -> None:
    # Integer histograms (modelopt checks that counts add up to an integer total): the TensorRT
    # mode collector over 8 batches (its range doubled, so the top bins are empty) and a one-pass
    # np.histogram, which is what modelopt's own collector builds.
    # Candidate range: modelopt tries i in range(start_bin=128, len(bins) + 1, stride=1) with
    # 128 levels (num_bits=8, unsigned=False) and takes the last argmin, like ours; its amax is
    # calib_bin_edges[i*], so passing the edges 0..2048 makes it return i* itself. It mutates the
    # counts it is given (bins[0] = bins[1] on a view), hence the copies.
    streamed = real_histograms(HistogramMode.TENSORRT)
    acts = cnn_activations(256)
    cases = [streamed["r1"], streamed["f1"]]
    conv = np.abs(acts["c2"])
    counts, _ = np.histogram(conv, bins=2048, range=(0.0, float(conv.max())))
    cases.append(Histogram(counts=counts, max_abs=float(conv.max())))
    for hist in cases:
        edges = np.arange(hist.num_bins + 1, dtype=np.float64)
        theirs = modelopt_histogram._compute_amax_entropy(
            np.array(hist.counts), edges, 8, False, stride=1, start_bin=128
        )
        assert entropy_bin(hist) == int(theirs.item())
        assert entropy_amax(hist) == pytest.approx((int(theirs.item()) + 0.5) * hist.bin_width)


# --------------------------------------------------------------------------------------------
# percentile, mse


def test_percentile_interpolates_within_the_bin() -> None:
    hist = Histogram(counts=np.array([0, 10, 0, 0]), max_abs=4.0)
    assert percentile_amax(hist, 50.0) == 1.5
    assert percentile_amax(hist, 100.0) == 2.0  # the top of the last non-empty bin
    uniform = Histogram(counts=np.full(2048, 3.0), max_abs=2.0)
    assert percentile_amax(uniform, 25.0) == pytest.approx(0.5)
    assert compute_amax(percentile(), uniform) == pytest.approx(2.0 * 0.9999)


def test_percentile_of_real_data_matches_numpy() -> None:
    values = np.abs(np.random.default_rng(2).standard_t(3, 500_000)).astype(np.float32)
    hist = histogram_of(values)
    for p in (50.0, 99.0, 99.99):
        expected = float(np.percentile(values, p))
        assert percentile_amax(hist, p) == pytest.approx(expected, abs=hist.bin_width)
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        percentile_amax(hist, 0.0)


def fake_quant_mse(values: np.ndarray, amax: float) -> float:
    step = amax / 127
    quantized = np.minimum(np.floor(values / step + 0.5), 127) * step
    return float(np.mean((values - quantized) ** 2))


def test_mse_finds_the_best_range_on_the_samples() -> None:
    rng = np.random.default_rng(3)
    values = np.abs(rng.laplace(0.0, 1.0, 300_000)).astype(np.float64)
    hist = histogram_of(values)
    amax = mse_amax(hist)
    assert amax < 0.8 * hist.max_abs  # clipping the Laplace tail pays off
    grid = np.linspace(128, 2048, 97) * hist.bin_width
    best = min(fake_quant_mse(values, a) for a in grid)
    assert fake_quant_mse(values, amax) <= best * 1.01
    assert fake_quant_mse(values, amax) < fake_quant_mse(values, hist.max_abs)


def test_mse_keeps_the_full_range_of_a_uniform_spread() -> None:
    hist = Histogram(counts=np.full(2048, 10.0), max_abs=1.0)
    assert mse_amax(hist) > 0.99


def test_degenerate_histograms_give_the_range() -> None:
    empty = Histogram(counts=np.zeros(2048), max_abs=0.0)
    for spec in (entropy(), minmax(), percentile(), mse()):
        assert compute_amax(spec, empty) == 0.0


# --------------------------------------------------------------------------------------------
# MethodSpec and presets


def test_presets_and_params() -> None:
    assert entropy().params == {"num_quant_bins": 128}
    assert minmax().params == {}
    assert percentile().params == {"percentile": 99.99}
    assert percentile(99.9).percentile == 99.9
    assert mse().params == {"num_quant_bins": 128}
    assert method_spec("entropy") == entropy()
    assert method_spec("percentile") == percentile()
    assert method_spec(CalibrationMethod.PERCENTILE, percentile=99.5) == percentile(99.5)
    assert method_spec("percentile", percentile="99.9").percentile == 99.9
    assert method_spec("mse", num_quant_bins=None) == mse()
    assert auto().params == {"num_quant_bins": 128}
    assert auto(8).params == {"num_quant_bins": 128, "samples": 8}
    assert method_spec("auto") == auto()
    assert method_spec("auto", samples=8) == auto(samples=8)
    assert method_spec("auto", num_quant_bins=64).params == {"num_quant_bins": 64}
    assert MethodSpec.model_validate_json(auto(4).model_dump_json()) == auto(4)


def test_auto_measures_an_eighth_of_the_calibration_samples_from_4_to_16() -> None:
    assert [auto().auto_samples(n) for n in (1, 3, 16, 64, 100, 128, 2048)] == [
        1, 3, 4, 8, 12, 16, 16,
    ]
    assert [auto(32).auto_samples(n) for n in (8, 64)] == [8, 32]  # as asked, within the data


def test_auto_from_a_histogram_alone_is_the_least_error_of_the_tensor() -> None:
    values = np.abs(np.random.default_rng(7).standard_t(2, 300_000)).astype(np.float32)
    hist = histogram_of(values)
    candidates = auto_candidates(hist)
    label, _ = choose_by_tensor_error(hist, candidates)
    assert compute_amax(auto(), hist) == candidates[label]


def test_compute_amax_dispatches_to_the_method() -> None:
    values = np.abs(np.random.default_rng(4).standard_t(3, 100_000)).astype(np.float32)
    hist = histogram_of(values)
    assert compute_amax(entropy(), hist) == entropy_amax(hist)
    assert compute_amax(minmax(), hist) == hist.max_abs
    assert compute_amax(percentile(99.0), hist) == percentile_amax(hist, 99.0)
    assert compute_amax(mse(), hist) == mse_amax(hist)
    amaxes = {
        spec.method: compute_amax(spec, hist)
        for spec in (entropy(), minmax(), percentile(99.0), mse())
    }
    assert len(set(amaxes.values())) == 4


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: percentile(0.0), r"percentile must be in \(0, 100\], got 0"),
        (lambda: percentile(100.5), r"percentile must be in \(0, 100\]"),
        (lambda: percentile(float("nan")), r"percentile must be in \(0, 100\]"),
        (lambda: entropy(num_quant_bins=0), "num_quant_bins must be between 2 and 65536, got 0"),
        (lambda: mse(num_quant_bins=1), "num_quant_bins must be between 2"),
        (
            lambda: method_spec("minmax", percentile=99.0),
            "percentile applies only to method 'percentile'",
        ),
        (lambda: method_spec("percentile", num_quant_bins=64), "num_quant_bins applies only"),
        (lambda: method_spec("entropy", bins=3), "Extra inputs are not permitted"),
        (lambda: auto(samples=0), "samples must be between 1 and 4096, got 0"),
        (lambda: method_spec("auto", samples=5000), "samples must be between 1 and 4096"),
        (lambda: method_spec("mse", samples=8), "samples applies only to method 'auto'"),
        (lambda: auto(num_quant_bins=1), "num_quant_bins must be between 2"),
        (
            lambda: method_spec("kl"),
            "unknown calibration method 'kl'; choose one of auto, entropy, minmax",
        ),
    ],
)
def test_presets_refuse_bad_parameters(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_method_spec_is_frozen_and_round_trips_json() -> None:
    spec = percentile(99.9)
    with pytest.raises(pydantic.ValidationError):
        spec.percentile = 50.0  # type: ignore[misc]
    assert MethodSpec.model_validate_json(spec.model_dump_json()) == spec
    assert hash(spec) == hash(percentile(99.9))

