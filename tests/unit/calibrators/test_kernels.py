from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from calibrators.histogram import numpy_bins
from calibrators.kernels import (
    FloatBits,
    abs_peak_bits,
    binned_histogram,
    float_bits,
    for_each_tensor,
    numpy_histogram,
)


def _run(
    values: np.ndarray, top: float | None = None, bins: int = 2048
) -> tuple[np.ndarray, int, int]:
    """numpy_histogram over [0, top] (default max|x|) with numpy's edges and index dtype."""
    top = float(np.abs(values).max()) if top is None else top
    edges, scale, fast = numpy_bins(top, values.dtype, bins)
    counts = np.zeros(bins, dtype=np.int64)
    bits, layout = float_bits(values)
    peak, bad = numpy_histogram(
        values, bits, layout.abs_mask, layout.inf_bits, edges, scale, fast, counts
    )
    return counts, peak, bad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_histogram_is_numpys_histogram_bit_for_bit(dtype: type) -> None:
    rng = np.random.default_rng(0)
    values = (rng.standard_t(2, 50_001) * 3).astype(dtype)
    values[::3] = 0.0  # a ReLU's zeros hammer bin 0
    values[-1] = -np.abs(values).max() * 1.5  # the max in the last (partial) chunk
    mags = np.abs(values)
    top = float(mags.max())
    edges = np.histogram_bin_edges(mags, 2048, (0, top))
    # every edge, and one float either side of it: where numpy's corrections decide
    on_edges = np.concatenate([edges, np.nextafter(edges, 0), np.nextafter(edges, np.inf)])
    values = np.concatenate([values, on_edges[on_edges <= top].astype(dtype)])
    counts, peak, bad = _run(values)
    assert bad == -1
    assert FloatBits(np.dtype(dtype)).to_float(peak) == top
    np.testing.assert_array_equal(counts, np.histogram(np.abs(values), 2048, (0, top))[0])


def test_numpy_histogram_on_awkward_ranges_and_bin_counts() -> None:
    rng = np.random.default_rng(1)
    # 2**20 float32 bins: the rounding guard would span half a bin, so every value compares edges
    assert numpy_bins(3.0, np.float32, 1 << 20)[2][1] == 1.0
    cases = [(3.0, 2048), (0.1, 2048), (1e-30, 2048), (7.77e20, 2048), (1.0, 3), (5.5, 1000)]
    cases.append((3.0, 1 << 20))
    for top, bins in cases:
        values = (rng.uniform(-top, top, 20_000)).astype(np.float32)
        values[0] = top
        counts, _, _ = _run(values, bins=bins)
        expected = np.histogram(np.abs(values), bins, (0, float(np.abs(values).max())))[0]
        np.testing.assert_array_equal(counts, expected, err_msg=f"{top} {bins}")


def test_numpy_histogram_counts_values_above_the_range_in_the_last_bin() -> None:
    values = np.array([0.5, 1.0, 1.0000001, 30.0, -2.0], dtype=np.float32)
    counts, peak, bad = _run(values, top=1.0, bins=4)
    assert bad == -1 and FloatBits(np.dtype(np.float32)).to_float(peak) == 30.0
    assert counts.tolist() == [0, 0, 1, 4]


def test_numpy_bins_fall_back_to_float64_where_numpy_refuses_the_range() -> None:
    tiny = float(np.finfo(np.float32).smallest_subnormal) * 100
    with pytest.raises(ValueError, match="Too many bins"):
        np.histogram(np.array([tiny], np.float32), 2048, (0, tiny))
    edges, _, _ = numpy_bins(tiny, np.float32)
    assert edges.dtype == np.float64 and bool(np.all(np.diff(edges) > 0))
    counts, _, _ = _run(np.array([tiny, 0.0, -tiny / 2], np.float32))
    assert counts.sum() == 3 and counts[0] == 1 and counts[-1] == 1


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_numpy_histogram_reports_the_chunk_holding_a_non_finite_value(bad_value: float) -> None:
    values = np.ones(10_000, dtype=np.float32)
    values[9000] = bad_value
    counts, _, bad = _run(values, top=1.0)
    assert bad == 8192  # the start of the third 4096-value chunk
    assert counts.sum() == 8192  # nothing of it or after is counted


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
        "from calibrators.histogram import histograms_of\n"
        "h = histograms_of([{'a': [1.0, -3.0], 'b': [0.5]}], workers=2)\n"
        "print(h['a'].max_abs, h['b'].max_abs)\n"
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
