from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from calibrators.kernels import (
    FloatBits,
    abs_peak_bits,
    binned_histogram,
    fine_histogram,
    float_bits,
    for_each_tensor,
)

FINE = 1 << 14


def _reference(values: np.ndarray, log2_range: int) -> np.ndarray:
    """floor(|x| * F / 2**log2_range), counted in float64 by numpy."""
    index = np.floor(np.abs(values.astype(np.float64)) * math.ldexp(FINE, -log2_range))
    return np.bincount(index.astype(np.int64), minlength=FINE)


def _run(values: np.ndarray, log2_range: int = -100) -> tuple[np.ndarray, int, int, int]:
    counts = np.zeros(FINE, dtype=np.int64)
    bits, layout = float_bits(values)
    peak, log2, bad = fine_histogram(
        values,
        bits,
        layout.abs_mask,
        layout.inf_bits,
        layout.mantissa_bits,
        layout.bias,
        log2_range,
        -100,
        counts,
    )
    return counts, peak, log2, bad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fine_histogram_matches_numpy_at_the_final_range(dtype: type) -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(-5, 5, 50_001).astype(dtype)
    values[::3] = 0.0  # a ReLU's zeros hammer bin 0
    values[-1] = -7.5  # the max arrives in the last (partial) chunk: the range grows late
    counts, peak, log2, bad = _run(values)
    assert bad == -1
    assert log2 == 3  # 7.5 < 2**3
    assert FloatBits(np.dtype(dtype)).to_float(peak) == 7.5
    np.testing.assert_array_equal(counts, _reference(values, 3))
    assert counts.sum() == values.size


def test_fine_histogram_powers_of_two_and_subnormals_land_in_exact_bins() -> None:
    values = np.array([1.0, 2.0, 0.5, 1e-40, -4.0, 3.999999], dtype=np.float32)
    counts, _, log2, _ = _run(values)
    assert log2 == 3  # 4.0 needs a range strictly above it
    np.testing.assert_array_equal(counts, _reference(values, 3))
    assert counts[FINE // 2] == 1  # 4.0 is exactly half of 8


def test_fine_histogram_keeps_a_wider_starting_range() -> None:
    values = np.linspace(-1, 1, 10_000, dtype=np.float32)
    counts, _, log2, _ = _run(values, log2_range=5)
    assert log2 == 5
    np.testing.assert_array_equal(counts, _reference(values, 5))


def test_fine_histogram_folds_existing_counts_when_the_range_grows() -> None:
    small = np.full(5000, 0.01, dtype=np.float32)
    large = np.array([1000.0], dtype=np.float32)
    counts, _, first, _ = _run(small)
    bits, layout = float_bits(large)
    _, log2, _ = fine_histogram(
        large, bits, layout.abs_mask, layout.inf_bits, layout.mantissa_bits, layout.bias,
        first, -100, counts,
    )  # fmt: skip
    assert log2 == 10
    np.testing.assert_array_equal(counts, _reference(np.concatenate([small, large]), 10))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_fine_histogram_reports_the_chunk_holding_a_non_finite_value(bad_value: float) -> None:
    values = np.ones(10_000, dtype=np.float32)
    values[9000] = bad_value
    _, _, _, bad = _run(values)
    assert bad == 8192  # the start of the third 4096-value chunk


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_abs_peak_bits_is_max_abs_and_flags_non_finite(dtype: type) -> None:
    values = np.array([0.25, -3.5, 2.0, -0.0], dtype=dtype)
    bits, layout = float_bits(values)
    peak = abs_peak_bits(bits, layout.abs_mask)
    assert layout.is_finite(peak) and layout.to_float(peak) == 3.5
    for bad in (np.nan, -np.inf):
        values[1] = bad
        assert not layout.is_finite(abs_peak_bits(bits, layout.abs_mask))
    assert abs_peak_bits(bits[:0], layout.abs_mask) == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_log2_range_above_is_the_power_of_two_strictly_above(dtype: type) -> None:
    layout = FloatBits(np.dtype(dtype))
    tiny = np.finfo(dtype).smallest_subnormal
    for value in (1.0, 0.75, 3.0, 4.0, 1e-3, 123456.0, float(tiny), float(np.finfo(dtype).max)):
        bits = int(np.array([value], dtype=dtype).view(layout.uint)[0])
        expected = math.frexp(value)[1]  # value < 2**e, and 2**(e-1) <= value
        assert layout.log2_range_above(bits) >= expected
        assert layout.log2_range_above(bits) == expected or value < np.finfo(dtype).tiny


def test_float_bits_refuses_other_dtypes() -> None:
    with pytest.raises(TypeError, match="float32 or float64"):
        float_bits(np.zeros(3, dtype=np.float16))


def test_for_each_tensor_runs_everything_and_reraises() -> None:
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def work(name: str, values: np.ndarray) -> None:
        with lock:
            seen[name] = int(values.sum())
        if name == "bad":
            raise ValueError("boom")

    tensors = [(f"t{i}", np.full(i + 1, 1)) for i in range(10)]
    for_each_tensor(work, tensors, workers=3)
    assert seen == {f"t{i}": i + 1 for i in range(10)}
    with pytest.raises(ValueError, match="boom"):
        for_each_tensor(work, [*tensors, ("bad", np.zeros(2))], workers=2)
    assert "bad" in seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binned_histogram_matches_numpy_and_clamps_the_top(dtype: type) -> None:
    values = np.random.default_rng(3).uniform(-3, 3, 20_001).astype(dtype)
    values[:3] = [3.0, -3.0, 0.0]
    scale = dtype(2048 / 3.0)
    counts = np.zeros(2048, dtype=np.int64)
    binned_histogram(values, scale, counts)
    index = np.minimum((np.abs(values) * scale).astype(np.int64), 2047)  # same rounding
    np.testing.assert_array_equal(counts, np.bincount(index, minlength=2048))
    assert counts[-1] >= 2  # |x| == range lands in the last bin


def test_kernels_work_where_numba_cannot_cache(tmp_path: Path) -> None:
    # A read-only install without a writable home: numba finds no cache location. Simulated by
    # allowing only the IPython-cell locator, which never serves a regular file.
    script = (
        "from calibrators.histogram import HistogramCollector\n"
        "h = HistogramCollector(workers=2)\n"
        "h.observe_batch([('a', [1.0, -3.0]), ('b', [0.5])])\n"
        "print(h.histograms()['a'].max_abs, h.histograms()['b'].max_abs)\n"
    )
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "IPythonCacheLocator"}
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=Path(__file__).resolve().parents[3],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["3.0", "0.5"]
