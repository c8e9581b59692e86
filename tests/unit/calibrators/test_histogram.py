"""Streaming |x| histograms: exact mode is order/batch independent, tensorrt mode is TensorRT's."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibrators.collect import collect as run_collect
from calibrators.data import CalibrationDataset
from calibrators.errors import CalibrationError
from calibrators.histogram import Histogram, HistogramCollector, histograms_of
from calibrators.methods import entropy_amax, minmax_amax, mse_amax, percentile_amax
from calibrators.spec import HistogramMode
from tests import zoo

EXACT = HistogramMode.EXACT
TENSORRT = HistogramMode.TENSORRT


@functools.cache
def cnn_activations(samples: int = 256) -> dict[str, np.ndarray]:
    """Every intermediate tensor of the small CNN on its Fashion-MNIST-like images, [N, ...]."""
    model = zoo.small_cnn()
    known = {o.name for o in model.graph.output}
    for node in model.graph.node:
        model.graph.output.extend(
            onnx.ValueInfoProto(name=o) for o in node.output if o not in known
        )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    images = zoo.small_images(samples)
    names = [o.name for o in session.get_outputs()]
    values = session.run(None, {"image": images})
    return {"image": images, **dict(zip(names, values, strict=True))}


def collect(
    batches: list[dict[str, np.ndarray]], mode: HistogramMode = EXACT
) -> dict[str, Histogram]:
    """Every pass the mode needs over ``batches``, one tensor at a time (no threads)."""
    collector = HistogramCollector(mode, workers=1)
    for index in range(collector.passes(split_batches=False)):
        collector.begin_pass(index, [])
        for batch in batches:
            for name, values in batch.items():
                collector.observe(name, values)
            collector.end_batch()
    return collector.histograms()


def numpy_two_pass(values: np.ndarray, bins: int = 2048) -> np.ndarray:
    """What exact mode promises: numpy's histogram of |x| over [0, max|x|]."""
    mags = np.abs(values)
    return np.histogram(mags, bins, (0, float(mags.max())))[0]


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
    acts = cnn_activations()
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
            assert hist.counts.dtype == ref.counts.dtype == np.int64
            assert np.array_equal(hist.counts, ref.counts), name  # bit-identical
            assert all_amax(hist) == all_amax(ref), name


def test_exact_is_numpys_two_pass_histogram_of_every_activation() -> None:
    acts = cnn_activations()
    hists = collect(split(acts, np.arange(len(acts["image"])), 32))
    for name, values in acts.items():
        hist = hists[name]
        assert hist.num_bins == 2048
        assert hist.max_abs == float(np.abs(values).max())
        np.testing.assert_array_equal(hist.counts, numpy_two_pass(values), err_msg=name)
        assert hist.total == values.size
        assert hist.counts[-1] > 0  # the max lands in the last (closed) bin


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_matches_numpy_on_heavy_tails_and_on_bin_edges(dtype: type) -> None:
    rng = np.random.default_rng(1)
    for trial in range(12):
        scale = 10.0 ** rng.uniform(-6, 6)
        batches = [
            (rng.standard_t(2 + trial % 3, size=5000) * scale * s).astype(dtype)
            for s in (0.01, 1.0, 30.0, 2.0)
        ]
        values = np.concatenate(batches)
        # values exactly on numpy's float edges and one float either side of them: where the float
        # bin index and the edges disagree and numpy's correction steps decide
        edges = np.histogram_bin_edges(np.abs(values), 2048, (0, float(np.abs(values).max())))
        picks = edges[rng.integers(0, 2049, 300)]
        near = np.concatenate([picks, np.nextafter(picks, 0), np.nextafter(picks, np.inf)])
        near = near[near <= edges[-1]].astype(dtype)
        batches.append(near * np.where(rng.random(near.size) < 0.5, -1, 1).astype(dtype))
        hist = collect([{"t": b} for b in batches])["t"]
        np.testing.assert_array_equal(
            hist.counts, numpy_two_pass(np.concatenate(batches)), err_msg=str(trial)
        )


def test_exact_bins_that_numpy_leaves_empty_stay_empty() -> None:
    # A few huge values and many small ones: the re-binning of a finer histogram used to spread
    # counts into bins that hold no value at all, and KL decides by which bins are empty.
    rng = np.random.default_rng(7)
    values = np.concatenate(
        [rng.exponential(0.01, 65_000), [3.7, -5.1, 2.2], rng.uniform(0.5, 0.51, 533)]
    ).astype(np.float32)
    hist = collect([{"t": values[:30_000]}, {"t": values[30_000:]}])["t"]
    truth = numpy_two_pass(values)
    np.testing.assert_array_equal(hist.counts, truth)
    assert (truth == 0).sum() > 1500  # the test has teeth: most bins are empty
    assert entropy_amax(hist) == entropy_amax(Histogram(truth, float(np.abs(values).max())))


def test_exact_wide_dynamic_range_loses_nothing() -> None:
    rng = np.random.default_rng(3)
    tiny = rng.normal(0, 1e-6, 1000).astype(np.float32)
    huge = rng.normal(0, 1e6, 1000).astype(np.float32)
    grown = collect([{"t": tiny}, {"t": huge}])["t"]
    direct = collect([{"t": np.concatenate([huge, tiny])}])["t"]
    assert grown.max_abs == direct.max_abs == float(np.abs(huge).max())
    assert np.array_equal(grown.counts, direct.counts)
    np.testing.assert_array_equal(grown.counts, numpy_two_pass(np.concatenate([tiny, huge])))
    assert grown.total == 2000
    assert grown.counts[0] >= 1000  # the tiny values all fall in bin 0


def test_exact_long_batches_span_many_chunks() -> None:
    # Larger than the kernel's chunks, with the max in a late chunk.
    values = np.concatenate([np.full(70_000, 0.25, np.float32), np.full(70_000, 3.0, np.float32)])
    hist = collect([{"t": values}])["t"]
    assert hist.max_abs == 3.0
    assert hist.total == 140_000
    assert hist.counts[-1] == 70_000
    np.testing.assert_array_equal(hist.counts, numpy_two_pass(values))


def test_exact_needs_its_second_pass() -> None:
    collector = HistogramCollector()
    assert collector.passes(split_batches=False) == 2
    collector.observe("t", np.array([1.0, -2.0], np.float32))
    with pytest.raises(CalibrationError, match=r"'t'.*second pass") as info:
        collector.histograms()
    assert "begin_pass" in info.value.hint
    collector.begin_pass(1, ["t"])
    with pytest.raises(CalibrationError, match=r"'u'.*second pass"):  # never seen in the first
        collector.observe("u", np.ones(3, np.float32))
    collector.observe("t", np.array([1.0, -2.0], np.float32))
    assert collector.histograms()["t"].total == 2
    with pytest.raises(ValueError, match="pass index"):
        collector.begin_pass(2, ["t"])


def test_a_second_pass_above_the_first_max_counts_in_the_last_bin() -> None:
    # The runtime's rounding may differ between passes by an ulp: nothing is lost.
    collector = HistogramCollector()
    collector.observe("t", np.array([1.0, 0.5], np.float32))
    collector.begin_pass(1)
    collector.observe("t", np.array([np.nextafter(1.0, 2.0), 0.5], np.float32))
    hist = collector.histograms()["t"]
    assert hist.max_abs == 1.0 and hist.counts[-1] == 1 and hist.counts[1024] == 1


def test_zeros() -> None:
    hists = collect(
        [
            {"zeros": np.zeros((4, 5), np.float32), "mixed": np.array([0, 0, 2, -1], np.float32)},
            {"zeros": np.zeros(3, np.float32)},
        ]
    )
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
    assert ints.max_abs == 3.0 and ints.total == 4


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
        batches = [
            {"b": np.ones(2, np.float32), "empty": np.zeros((0, 3), np.float32)},
            {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)},
        ]
        assert list(collect(batches, mode)) == ["b", "a"]
        collector = HistogramCollector(mode)
        collector.observe("b", np.ones(2, np.float32))
        collector.observe("a", np.ones(2, np.float32))
        assert collector.tensor_names == ("b", "a")


def test_collector_rejects_bad_num_bins() -> None:
    for bad in (0, 1, 2.5, True):
        with pytest.raises(ValueError, match="num_bins"):
            HistogramCollector(num_bins=bad)  # type: ignore[arg-type]


def test_custom_num_bins() -> None:
    values = np.linspace(-1.0, 1.0, 1001, dtype=np.float32)
    for mode in HistogramMode:
        hist = histograms_of([{"t": values}], mode, num_bins=100)["t"]
        assert hist.num_bins == 100 and hist.max_abs == 1.0
        assert hist.total == 1001
    exact = histograms_of([{"t": values}], num_bins=100)["t"]
    np.testing.assert_array_equal(exact.counts, numpy_two_pass(values, 100))


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


def test_tensorrt_batches_split_into_micro_batches_give_the_whole_batches_histogram() -> None:
    # A memory limit may cut TensorRT's batch into micro-batches; the range decisions stay those
    # of whole batches (first batch sets it, later batches double it), so the counts do too.
    rng = np.random.default_rng(8)
    batches = [
        {"t": rng.normal(0, s, 3000).astype(np.float32), "z": np.zeros(3000, np.float32)}
        for s in (0.5, 0.1, 3.0, 1.0, 9.0)
    ]
    batches[1]["z"][7] = 0.25  # "z": zeros until its second batch sets a range
    whole = collect(batches, TENSORRT)
    split_collector = HistogramCollector(TENSORRT, workers=2)
    assert split_collector.passes(split_batches=True) == 2
    for index in range(2):
        split_collector.begin_pass(index, ["t", "z"])
        for batch in batches:
            for start in range(0, 3000, 700):  # uneven micro-batches, the first not the widest
                split_collector.observe_batch(
                    [(n, v[start : start + 700]) for n, v in batch.items()]
                )
            split_collector.end_batch()
    micro = split_collector.histograms()
    micro_batches = [
        {n: v[s : s + 700] for n, v in b.items()} for b in batches for s in range(0, 3000, 700)
    ]
    naive = collect(micro_batches, TENSORRT)
    for name in ("t", "z"):
        assert micro[name].max_abs == whole[name].max_abs
        np.testing.assert_array_equal(micro[name].counts, whole[name].counts)
    assert naive["t"].max_abs != whole["t"].max_abs  # micro-batches as batches would differ


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
    acts = cnn_activations(64)
    batches = split(acts, np.arange(64), 16)
    threaded = histograms_of(batches, mode, workers=2)
    sequential = collect(batches, mode)
    assert list(threaded) == list(acts)  # graph order, not largest-first
    for name, hist in threaded.items():
        assert hist.max_abs == sequential[name].max_abs
        np.testing.assert_array_equal(hist.counts, sequential[name].counts)


# --------------------------------------------------------------------------------------------
# a calibration run's exact histograms are numpy's


class Tee(HistogramCollector):
    """The exact collector, keeping a copy of every value its counting pass sees."""

    def __init__(self) -> None:
        super().__init__(EXACT, workers=2)
        self.values: dict[str, list[np.ndarray]] = {}
        self.pass_index = 0

    def begin_pass(self, index: int, tensors: Sequence[str] = ()) -> None:
        super().begin_pass(index, tensors)
        self.pass_index = index

    def observe_batch(self, tensors: Sequence[tuple[str, np.ndarray]]) -> None:
        super().observe_batch(tensors)
        if self.pass_index == 1:
            for name, values in tensors:
                self.values.setdefault(name, []).append(values.copy())


def _tiny_cnn(tmp: Path) -> tuple[Path, dict[str, np.ndarray]]:
    onnx.save(zoo.tiny_cnn(), tmp / "tiny.onnx")
    images = np.random.default_rng(0).normal(0, 1, (37, 3, 16, 16)).astype(np.float32)
    return tmp / "tiny.onnx", {"image": images}


def _two_input(tmp: Path) -> tuple[Path, dict[str, np.ndarray]]:
    onnx.save(zoo.tiny_two_input(), tmp / "two.onnx")
    rng = np.random.default_rng(1)
    x = rng.standard_t(3, (50, 4)).astype(np.float32)
    return tmp / "two.onnx", {"x": x, "ids": rng.integers(0, 20, (50, 3))}


def _small_cnn(tmp: Path) -> tuple[Path, dict[str, np.ndarray]]:
    onnx.save(zoo.small_cnn(), tmp / "small.onnx")
    return tmp / "small.onnx", {"image": zoo.small_images(200, seed=3)}


MODELS = [_tiny_cnn, _two_input, _small_cnn]


@pytest.mark.parametrize("model", MODELS, ids=["tiny_cnn", "two_input", "small_cnn"])
@pytest.mark.parametrize("memory_limit_bytes", [None, 40 * 1024], ids=["default", "groups"])
def test_exact_histograms_of_a_calibration_run_are_numpys_two_pass_histograms(
    tmp_path: Path,
    model: Callable[[Path], tuple[Path, dict[str, np.ndarray]]],
    memory_limit_bytes: int | None,
) -> None:
    path, arrays = model(tmp_path)
    tee = Tee()
    data = CalibrationDataset.from_arrays(arrays)
    run_collect(path, data, tee, batch_size=16, memory_limit_bytes=memory_limit_bytes)
    hists = tee.histograms()
    assert set(tee.values) == set(hists) - set(tee.aliases)
    for name, batches in tee.values.items():
        values = np.concatenate(batches)
        assert hists[name].max_abs == float(np.abs(values).max()), name  # the same values twice
        np.testing.assert_array_equal(hists[name].counts, numpy_two_pass(values), err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["efficientnet_lite0", "minilm"])
def test_exact_histograms_of_real_models_are_numpys_two_pass_histograms(which: str) -> None:
    if which == "minilm":
        path, arrays = zoo.minilm(), zoo.minilm_inputs(zoo.SENTENCES[:16])
    else:
        path = zoo.efficientnet_lite0()
        arrays = {"input": zoo.preprocess_imagenet(zoo.photo_crops(12, seed=0))}
    tee = Tee()
    # a limit below one sample's activations: groups of tensors, micro-batches, two passes each
    run_collect(path, CalibrationDataset.from_arrays(arrays), tee, batch_size=8,
                memory_limit_bytes=8 << 20)  # fmt: skip
    hists = tee.histograms()
    assert len(tee.values) > 50
    for name, batches in tee.values.items():
        values = np.concatenate(batches)
        assert hists[name].max_abs == float(np.abs(values).max()), name
        np.testing.assert_array_equal(hists[name].counts, numpy_two_pass(values), err_msg=name)
