"""Streaming |x| histograms: exact mode is order/batch independent, tensorrt mode is TensorRT's."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibrators.errors import CalibrationError
from calibrators.histogram import Histogram, HistogramCollector, HistogramMode
from calibrators.methods import entropy_amax, minmax_amax, mse_amax, percentile_amax
from tests import zoo

EXACT = HistogramMode.EXACT
TENSORRT = HistogramMode.TENSORRT


@functools.cache
def fashion_activations(samples: int = 256) -> dict[str, np.ndarray]:
    """Every intermediate tensor of the trained Fashion-MNIST CNN on real test images, [N, ...]."""
    model = onnx.load(zoo.fashion_cnn())
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        model.graph.output.extend(
            onnx.ValueInfoProto(name=o) for o in node.output if o not in known
        )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images, _ = zoo.fashion_mnist("test")
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {"image": images[:samples]})
    return {"image": images[:samples], **dict(zip(names, values, strict=True))}


def collect(
    batches: list[dict[str, np.ndarray]], mode: HistogramMode = EXACT
) -> dict[str, Histogram]:
    collector = HistogramCollector(mode)
    for batch in batches:
        for name, values in batch.items():
            collector.observe(name, values)
    return collector.histograms()


def split(
    arrays: dict[str, np.ndarray], order: np.ndarray, batch: int
) -> list[dict[str, np.ndarray]]:
    return [
        {name: values[order[s : s + batch]] for name, values in arrays.items()}
        for s in range(0, order.size, batch)
    ]


def all_amax(hist: Histogram) -> tuple[float, ...]:
    return entropy_amax(hist), minmax_amax(hist), percentile_amax(hist, 99.9), mse_amax(hist)


# --------------------------------------------------------------------------------------------
# exact mode


def test_exact_is_independent_of_batch_order_and_size() -> None:
    acts = fashion_activations()
    n = len(acts["image"])
    rng = np.random.default_rng(0)
    runs = [
        collect(split(acts, np.arange(n), 16)),
        collect(split(acts, rng.permutation(n), 16)),
        collect(split(acts, rng.permutation(n), 7)),
        collect(split(acts, np.arange(n)[::-1], n)),
    ]
    reference = runs[0]
    assert len(reference) == len(acts)
    for run in runs[1:]:
        assert run.keys() == reference.keys()
        for name, hist in run.items():
            ref = reference[name]
            assert hist.max_abs == ref.max_abs, name
            assert hist.counts.dtype == ref.counts.dtype == np.float64
            assert np.array_equal(hist.counts, ref.counts), name  # bit-identical
            assert all_amax(hist) == all_amax(ref), name


def test_exact_range_is_the_data_max_and_no_count_is_lost() -> None:
    acts = fashion_activations()
    hists = collect(split(acts, np.arange(len(acts["image"])), 32))
    for name, values in acts.items():
        hist = hists[name]
        assert hist.num_bins == 2048
        assert hist.max_abs == float(np.abs(values).max())
        assert hist.total == pytest.approx(values.size, rel=1e-12)
        assert hist.counts[-1] > 0  # the max lands in the last bin


def test_exact_matches_a_two_pass_histogram_within_a_fine_bin() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_t(3, size=5000).astype(np.float32) * s for s in (0.01, 1.0, 30.0, 2.0)]
    hist = collect([{"t": b} for b in batches])["t"]
    mags = np.abs(np.concatenate(batches))
    truth, _ = np.histogram(mags, bins=2048, range=(0.0, float(mags.max())))
    ours_cum = np.concatenate(([0.0], np.cumsum(hist.counts)))
    true_cum = np.concatenate(([0], np.cumsum(truth)))
    # A target edge falls in one fine bin of at most a quarter target width: only that fine bin's
    # mass can be misplaced, and it lies in the two target bins around the edge.
    around_edge = np.concatenate(([0], truth)) + np.concatenate((truth, [0]))
    assert np.all(np.abs(ours_cum - true_cum) <= around_edge + 1e-6)
    assert np.abs(ours_cum - true_cum).max() > 0  # the approximation is real, not vacuous


def test_exact_is_the_two_pass_histogram_when_the_max_is_a_power_of_two() -> None:
    # max = 4 = 2**2: fine range 8, 16384 fine bins; every target bin is exactly 4 fine bins.
    rng = np.random.default_rng(2)
    values = rng.uniform(-4.0, 4.0, size=(3, 10_000)).astype(np.float32)
    values[1, 7] = -4.0
    hist = collect([{"t": v} for v in values])["t"]
    truth, _ = np.histogram(np.abs(values), bins=2048, range=(0.0, 4.0))
    assert hist.max_abs == 4.0
    assert np.array_equal(hist.counts, truth.astype(np.float64))


def test_exact_growth_by_many_doublings_loses_nothing() -> None:
    rng = np.random.default_rng(3)
    tiny = rng.normal(0, 1e-6, 1000).astype(np.float32)
    huge = rng.normal(0, 1e6, 1000).astype(np.float32)
    grown = collect([{"t": tiny}, {"t": huge}])["t"]  # about 40 doublings at once
    direct = collect([{"t": np.concatenate([huge, tiny])}])["t"]
    assert grown.max_abs == direct.max_abs == float(np.abs(huge).max())
    assert np.array_equal(grown.counts, direct.counts)
    assert grown.total == pytest.approx(2000, rel=1e-12)
    assert grown.counts[0] >= 1000  # the tiny values all fall in bin 0


def test_exact_chunked_growth_inside_one_batch() -> None:
    # Larger than one 65536-element chunk, with the range growing in a later chunk.
    values = np.concatenate([np.full(70_000, 0.25, np.float32), np.full(70_000, 3.0, np.float32)])
    hist = collect([{"t": values}])["t"]
    assert hist.max_abs == 3.0
    assert hist.total == pytest.approx(140_000, rel=1e-12)
    assert hist.counts[-1] == pytest.approx(70_000)
    edge = 0.25 / hist.bin_width  # 0.25 sits at bin 170.67: its 70000 counts stay together
    assert hist.counts[int(edge)] == pytest.approx(70_000)


def test_zeros() -> None:
    collector = HistogramCollector()
    collector.observe("zeros", np.zeros((4, 5), np.float32))
    collector.observe("zeros", np.zeros(3, np.float32))
    collector.observe("mixed", np.array([0.0, 0.0, 2.0, -1.0], np.float32))
    hists = collector.histograms()
    zeros = hists["zeros"]
    assert zeros.max_abs == 0.0 and zeros.bin_width == 0.0
    assert zeros.counts[0] == 23 and zeros.total == 23
    assert all_amax(zeros) == (0.0, 0.0, 0.0, 0.0)
    mixed = hists["mixed"]
    assert mixed.max_abs == 2.0
    assert mixed.counts[0] == 2 and mixed.counts[1024] == 1 and mixed.counts[2047] == 1


@pytest.mark.parametrize("mode", list(HistogramMode))
def test_negative_values_count_as_their_magnitude(mode: HistogramMode) -> None:
    rng = np.random.default_rng(4)
    batches = [rng.normal(0, s, 4096).astype(np.float32) for s in (1.0, 3.0)]
    plus = collect([{"t": np.abs(b)} for b in batches], mode)["t"]
    minus = collect([{"t": -np.abs(b)} for b in batches], mode)["t"]
    mixed = collect([{"t": b} for b in batches], mode)["t"]
    for hist in (minus, mixed):
        assert hist.max_abs == plus.max_abs
        assert np.array_equal(hist.counts, plus.counts)


@pytest.mark.parametrize("mode", list(HistogramMode))
def test_dtypes_give_the_same_histogram(mode: HistogramMode) -> None:
    values = np.random.default_rng(5).normal(0, 2, 10_000).astype(np.float16)
    ref = collect([{"t": values.astype(np.float32)}], mode)["t"]
    for dtype in (np.float16, np.float64):
        hist = collect([{"t": values.astype(dtype)}], mode)["t"]
        assert hist.max_abs == ref.max_abs
        assert np.array_equal(hist.counts, ref.counts)
    ints = collect([{"t": np.array([-3, 0, 1, 3])}], mode)["t"]
    assert ints.max_abs == 3.0 and ints.total == pytest.approx(4)


@pytest.mark.parametrize("mode", list(HistogramMode))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_naming_the_tensor(mode: HistogramMode, bad: float) -> None:
    collector = HistogramCollector(mode)
    collector.observe("conv1_out", np.ones(10, np.float32))
    values = np.ones(100_000, np.float32)
    values[99_999] = bad
    with pytest.raises(CalibrationError, match=r"'conv1_out'.*NaN or Inf.*batch 2") as info:
        collector.observe("conv1_out", values)
    assert info.value.field == "conv1_out"
    assert "preprocessing" in info.value.hint


def test_complex_values_are_refused() -> None:
    with pytest.raises(CalibrationError, match="'z'"):
        HistogramCollector().observe("z", np.ones(3, np.complex64))


def test_tensor_names_keep_first_observed_order_and_empty_arrays_are_ignored() -> None:
    for mode in HistogramMode:
        collector = HistogramCollector(mode)
        collector.observe("b", np.ones(2, np.float32))
        collector.observe("empty", np.zeros((0, 3), np.float32))
        collector.observe("a", np.ones(2, np.float32))
        collector.observe("b", np.ones(2, np.float32))
        assert collector.tensor_names == ("b", "a")
        assert list(collector.histograms()) == ["b", "a"]


def test_collector_rejects_bad_num_bins() -> None:
    for bad in (0, 1, 2.5, True):
        with pytest.raises(ValueError, match="num_bins"):
            HistogramCollector(num_bins=bad)  # type: ignore[arg-type]


def test_custom_num_bins() -> None:
    values = np.linspace(-1.0, 1.0, 1001, dtype=np.float32)
    for mode in HistogramMode:
        collector = HistogramCollector(mode, num_bins=100)
        collector.observe("t", values)
        hist = collector.histograms()["t"]
        assert hist.num_bins == 100 and hist.max_abs == 1.0
        assert hist.total == pytest.approx(1001)
    assert HistogramCollector(num_bins=100).fine_bins == 1024


# --------------------------------------------------------------------------------------------
# tensorrt mode


def test_tensorrt_range_doubles_by_merging_bin_pairs() -> None:
    first = np.linspace(0.0, 1.0, 4096, dtype=np.float32)
    second = np.array([2.5, 0.1], dtype=np.float32)
    collector = HistogramCollector(TENSORRT)
    collector.observe("t", first)
    after_first = collector.histograms()["t"]
    assert after_first.max_abs == 1.0 and after_first.counts.dtype == np.int64
    assert np.array_equal(after_first.counts, np.histogram(first, 2048, range=(0.0, 1.0))[0])
    collector.observe("t", second)
    hist = collector.histograms()["t"]
    assert hist.max_abs == 4.0  # 1 -> 2 -> 4
    expected = np.zeros(2048, np.int64)
    expected[:512] = after_first.counts.reshape(512, 4).sum(axis=1)  # two merges of pairs
    expected[int(2.5 / 4.0 * 2048)] += 1
    expected[int(0.1 / 4.0 * 2048)] += 1
    assert np.array_equal(hist.counts, expected)
    assert hist.total == 4098


def test_tensorrt_mode_depends_on_batch_order_where_exact_does_not() -> None:
    rng = np.random.default_rng(6)
    small = rng.uniform(-1.0, 1.0, 50_000).astype(np.float32)
    large = rng.uniform(-3.0, 3.0, 50_000).astype(np.float32)
    small_first = collect([{"t": small}, {"t": large}], TENSORRT)["t"]
    large_first = collect([{"t": large}, {"t": small}], TENSORRT)["t"]
    peak_small, peak_large = float(np.abs(small).max()), float(np.abs(large).max())
    assert large_first.max_abs == peak_large
    assert small_first.max_abs == peak_small * 4  # doubled twice to cover the large batch
    assert small_first.total == large_first.total == 100_000
    assert entropy_amax(small_first) != entropy_amax(large_first)
    exact = [
        collect(order)["t"]
        for order in ([{"t": small}, {"t": large}], [{"t": large}, {"t": small}])
    ]
    assert np.array_equal(exact[0].counts, exact[1].counts)


def test_tensorrt_zeros_before_the_first_range_are_kept() -> None:
    collector = HistogramCollector(TENSORRT)
    collector.observe("t", np.zeros(10, np.float32))
    assert collector.histograms()["t"].max_abs == 0.0
    collector.observe("t", np.array([0.5, -1.0], np.float32))
    hist = collector.histograms()["t"]
    assert hist.max_abs == 1.0
    assert hist.counts[0] == 10 and hist.counts[1024] == 1 and hist.counts[2047] == 1


def test_tensorrt_growth_by_many_doublings() -> None:
    collector = HistogramCollector(TENSORRT)
    collector.observe("t", np.array([1e-3, 5e-4], np.float32))
    collector.observe("t", np.array([1e3], np.float32))
    hist = collector.histograms()["t"]
    assert hist.max_abs == pytest.approx(float(np.float32(1e-3)) * 2**20)  # 2**20 >= 1e6
    assert hist.total == 3 and hist.counts[0] == 2


# --------------------------------------------------------------------------------------------
# Histogram


def test_histogram_properties_and_validation() -> None:
    hist = Histogram(counts=np.array([1, 2, 3, 4]), max_abs=2.0)
    assert (hist.num_bins, hist.bin_width, hist.total) == (4, 0.5, 10.0)
    assert hist.counts.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        hist.counts[0] = 5
    with pytest.raises(ValueError, match="non-empty 1-D"):
        Histogram(counts=np.ones((2, 2)), max_abs=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        Histogram(counts=np.array([1.0, -1.0]), max_abs=1.0)
    with pytest.raises(ValueError, match="max_abs"):
        Histogram(counts=np.ones(4), max_abs=float("nan"))


def test_histogram_copies_its_counts() -> None:
    counts = np.array([1.0, 2.0])
    hist = Histogram(counts=counts, max_abs=1.0)
    counts[0] = 100.0
    assert hist.counts[0] == 1.0


@pytest.mark.parametrize("mode", [EXACT, TENSORRT])
def test_observe_batch_on_threads_equals_one_tensor_at_a_time(mode: HistogramMode) -> None:
    acts = fashion_activations(64)
    batches = split(acts, np.arange(64), 16)
    threaded = HistogramCollector(mode, workers=2)
    for batch in batches:
        threaded.observe_batch(list(batch.items()))
    sequential = collect(batches, mode)
    assert threaded.tensor_names == tuple(acts)  # graph order, not largest-first
    for name, hist in threaded.histograms().items():
        assert hist.max_abs == sequential[name].max_abs
        np.testing.assert_array_equal(hist.counts, sequential[name].counts)
