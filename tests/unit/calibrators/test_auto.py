"""auto: per tensor, the candidate range with the least error at the outputs of the nodes reading
it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.auto import _spread, choose_ranges, weighted_consumers
from calibrators.calibrate import calibrate, table_cache_key
from calibrators.candidates import quantization_error
from calibrators.collect import observable_tensors
from calibrators.data import CalibrationDataset
from calibrators.histogram import histograms_of
from calibrators.spec import CalibrationMethod, HistogramMode, auto, entropy, method_spec, minmax
from calibrators.table import CalibrationTable, RangeCriterion
from calibrators.weights import fake_quantize, fake_quantize_weight

F = TensorProto.FLOAT


def _save(tmp_path: Path, graph: onnx.GraphProto, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def _wide_channel_data(n: int = 32, seed: int = 0) -> np.ndarray:
    """16 channels: 15 narrow, mostly-zero ones (a ReLU's output) and one 10x wider channel."""
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, 16, 8, 8)) * 0.02, 0.0)
    x[:, 0] = np.abs(rng.standard_normal((n, 8, 8))) * 0.15
    return x.astype(np.float32)


def _conv_weights(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((8, 16, 1, 1)) * 0.05).astype(np.float32)
    w[:, 0] = 1.0  # the wide channel carries the layer
    return w, (rng.standard_normal(8) * 0.1).astype(np.float32)


def _conv_model(tmp_path: Path) -> Path:
    """x -> 1x1 Conv (with bias) -> y: the pattern that collapsed a real recognizer."""
    w, b = _conv_weights()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        "wide",
        [helper.make_tensor_value_info("x", F, ["n", 16, 8, 8])],
        [helper.make_tensor_value_info("y", F, ["n", 8, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return _save(tmp_path, graph)


def _conv_error(x: np.ndarray, amax: float) -> float:
    """||Q(W) * Q(x) - W * x||^2 / ||W * x||^2 for the 1x1 Conv, in numpy."""
    w, _ = _conv_weights()
    wq = fake_quantize_weight(w, 0)[:, :, 0, 0].astype(np.float64)
    ref = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.float64), x.astype(np.float64))
    got = np.einsum("oc,nchw->nohw", wq, fake_quantize(x, amax).astype(np.float64))
    return float(np.sum((got - ref) ** 2) / np.sum(ref**2))


def test_a_wide_channel_feeding_a_conv_is_not_clipped(tmp_path: Path) -> None:
    path = _conv_model(tmp_path)
    x = _wide_channel_data()
    dataset = CalibrationDataset.from_arrays({"x": x})
    table = calibrate(path, dataset, auto(samples=32), batch_size=8)
    baseline = calibrate(path, dataset, entropy(), batch_size=8)
    assert table.method is CalibrationMethod.AUTO
    assert table.range_choices is not None
    choice = table.range_choices["x"]
    assert choice.criterion is RangeCriterion.CONSUMER_OUTPUT
    assert choice.consumers == ("conv",)
    assert choice.method != "entropy"
    assert choice.candidates["entropy"] == pytest.approx(baseline.amax["x"])
    # the recorded errors are the consumer's true errors, and the choice is the least of them
    for label, amax in choice.candidates.items():
        assert choice.errors[label] == pytest.approx(_conv_error(x, amax), rel=1e-3)
    assert choice.errors[choice.method] == min(choice.errors.values())
    assert table.amax["x"] == choice.candidates[choice.method]
    assert _conv_error(x, table.amax["x"]) < 0.5 * _conv_error(x, baseline.amax["x"])
    # y feeds nothing weighted: judged by its own error
    assert table.range_choices["y"].criterion is RangeCriterion.TENSOR
    own = table.range_choices["y"].errors
    assert own[table.range_choices["y"].method] == min(own.values())


def test_auto_table_round_trips_and_its_cache_holds_only_scales(tmp_path: Path) -> None:
    path = _conv_model(tmp_path)
    dataset = CalibrationDataset.from_arrays({"x": _wide_channel_data(8)})
    table = calibrate(path, dataset, auto(samples=4), batch_size=4)
    assert table.parameters["samples"] == 4
    assert table.parameters["measured_samples"] == 4
    assert table.parameters["num_quant_bins"] == 128
    assert set(table.range_choices or {}) == set(table.amax)
    back = CalibrationTable.load(table.save(tmp_path / "t.json"))
    assert back == table
    cache = CalibrationTable.load(table.save(tmp_path / "t.cache"))
    assert cache.range_choices is None
    assert cache.amax == pytest.approx(table.amax, rel=1e-6)


def _alias_pad_model(tmp_path: Path) -> Path:
    """x -> Relu -> r; r -> Pad(0) -> Conv -> c; r -> Flatten -> Gemm(transB) -> g;
    c -> Sigmoid -> s; c -> Add(c, s) -> a; r -> MatMul(r, r)."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 2, 3, 3)) * 0.3).astype(np.float32), "wc"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array((rng.standard_normal((5, 32)) * 0.2).astype(np.float32), "wg"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Pad", ["r", "pads"], ["p"], name="pad"),
        helper.make_node("Conv", ["p", "wc"], ["c"], name="conv"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wg"], ["g"], name="gemm", transB=1),
        helper.make_node("Sigmoid", ["c"], ["s"], name="sigmoid"),
        helper.make_node("Add", ["c", "s"], ["a"], name="add"),
        helper.make_node("MatMul", ["r", "r"], ["m"], name="square"),
    ]
    graph = helper.make_graph(
        nodes,
        "aliases",
        [helper.make_tensor_value_info("x", F, ["n", 2, 4, 4])],
        [
            helper.make_tensor_value_info("g", F, ["n", 5]),
            helper.make_tensor_value_info("a", F, ["n", 4, 4, 4]),
            helper.make_tensor_value_info("m", F, ["n", 2, 4, 4]),
        ],
        inits,
    )
    return _save(tmp_path, graph)


def test_consumers_are_found_through_aliases_and_zero_pads(tmp_path: Path) -> None:
    path = _alias_pad_model(tmp_path)
    model = onnx.load(str(path))
    plan = observable_tensors(model)
    found = weighted_consumers(model, plan.observed, plan.aliases)
    assert [(c.node, c.tensor, c.root) for c in found] == [
        ("conv", "p", "r"),  # the Q/DQ pass puts the pair above the zero Pad, on r
        ("gemm", "f", "r"),  # Flatten is an alias of r
    ]  # MatMul(r, r) has no constant weight


def test_aliases_pads_and_bounds_in_a_whole_calibration(tmp_path: Path) -> None:
    path = _alias_pad_model(tmp_path)
    x = (np.random.default_rng(4).standard_normal((16, 2, 4, 4)) * 40).astype(np.float32)
    table = calibrate(path, CalibrationDataset.from_arrays({"x": x}), auto(samples=8))
    choices = table.range_choices
    assert choices is not None
    assert choices["r"].criterion is RangeCriterion.CONSUMER_OUTPUT
    assert choices["r"].consumers == ("conv", "gemm")
    assert choices["f"] == choices["r"] and table.amax["f"] == table.amax["r"]
    # c feeds no weighted node (Sigmoid, Add): its own error decides
    assert choices["c"].criterion is RangeCriterion.TENSOR
    # the Sigmoid saturates at 1 on these inputs: it keeps its bound
    assert choices["s"].criterion is RangeCriterion.ACTIVATION_BOUND
    assert table.amax["s"] == pytest.approx(1.0)


def _square_conv_model(tmp_path: Path, residual: bool) -> Path:
    """x -> 1x1 Conv (16 -> 16) -> y, and with ``residual`` also z = x + y."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((16, 16, 1, 1)) * 0.05).astype(np.float32)
    w[:, 0] = 1.0
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    if residual:
        nodes.append(helper.make_node("Add", ["x", "y"], ["z"], name="add"))
    out = "z" if residual else "y"
    graph = helper.make_graph(
        nodes,
        "residual" if residual else "plain",
        [helper.make_tensor_value_info("x", F, ["n", 16, 8, 8])],
        [helper.make_tensor_value_info(out, F, ["n", 16, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    (tmp_path / out).mkdir()
    return _save(tmp_path / out, graph)


def test_the_tensor_itself_counts_when_an_add_reads_it_too(tmp_path: Path) -> None:
    x = _wide_channel_data(16)
    dataset = CalibrationDataset.from_arrays({"x": x})
    both = calibrate(_square_conv_model(tmp_path, True), dataset, auto(16)).range_choices
    conv = calibrate(_square_conv_model(tmp_path, False), dataset, auto(16)).range_choices
    assert both is not None and conv is not None
    hist = histograms_of([{"x": x}])["x"]
    assert both["x"].candidates == conv["x"].candidates
    for label, amax in both["x"].candidates.items():
        own = quantization_error(hist, amax)
        assert both["x"].errors[label] == pytest.approx((conv["x"].errors[label] + own) / 2)


def test_other_methods_record_no_choices(tmp_path: Path) -> None:
    path = _conv_model(tmp_path)
    dataset = CalibrationDataset.from_arrays({"x": _wide_channel_data(4)})
    assert calibrate(path, dataset, minmax()).range_choices is None
    assert calibrate(path, dataset, entropy()).range_choices is None


def test_wide_layers_are_measured_exactly_on_a_spread_of_output_channels(tmp_path: Path) -> None:
    """1x1 Conv with bias, MatMul on [n, T, K], Gemm with transB, alpha, beta and C: the recorded
    error of every candidate is the layer's true relative error on the measured channels."""
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((64, 8, 1, 1)) * 0.2).astype(np.float32)
    bias = rng.standard_normal(64).astype(np.float32)
    m = (rng.standard_normal((32, 48)) * 0.2).astype(np.float32)
    g = (rng.standard_normal((40, 32)) * 0.2).astype(np.float32)
    c = rng.standard_normal(40).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="conv"),
            helper.make_node("MatMul", ["v", "m"], ["mv"], name="matmul"),
            helper.make_node(
                "Gemm", ["u", "g", "c"], ["gu"], name="gemm", transB=1, alpha=0.5, beta=2.0
            ),
        ],
        "wide",
        [
            helper.make_tensor_value_info("x", F, ["n", 8, 4, 4]),
            helper.make_tensor_value_info("v", F, ["n", 5, 32]),
            helper.make_tensor_value_info("u", F, ["n", 32]),
        ],
        [
            helper.make_tensor_value_info("y", F, ["n", 64, 4, 4]),
            helper.make_tensor_value_info("mv", F, ["n", 5, 48]),
            helper.make_tensor_value_info("gu", F, ["n", 40]),
        ],
        [
            numpy_helper.from_array(array, name)
            for array, name in ((w, "w"), (bias, "bias"), (m, "m"), (g, "g"), (c, "c"))
        ],
    )
    path = _save(tmp_path, graph)
    n = 12
    data = {
        "x": (rng.standard_t(3, (n, 8, 4, 4))).astype(np.float32),
        "v": (rng.standard_t(3, (n, 5, 32))).astype(np.float32),
        "u": (rng.standard_t(3, (n, 32))).astype(np.float32),
    }
    table = calibrate(path, CalibrationDataset.from_arrays(data), auto(samples=n), batch_size=5)
    choices = table.range_choices
    assert choices is not None
    f64 = np.float64

    def relative(got: np.ndarray, ref: np.ndarray) -> float:
        return float(np.sum((got - ref) ** 2) / np.sum(ref**2))

    keep = _spread(64)
    assert keep is not None and keep.size == 16  # every 8th channel, at least 16
    wq = fake_quantize_weight(w, 0)[keep, :, 0, 0].astype(f64)
    for label, amax in choices["x"].candidates.items():
        xq = fake_quantize(data["x"], amax).astype(f64)
        ref = np.einsum("oc,nchw->nohw", w[keep, :, 0, 0].astype(f64), data["x"].astype(f64))
        got = np.einsum("oc,nchw->nohw", wq, xq)
        assert choices["x"].errors[label] == pytest.approx(relative(got, ref), rel=1e-3)
    keep = _spread(48)
    assert keep is not None
    mq = fake_quantize_weight(m, 1)[:, keep].astype(f64)
    for label, amax in choices["v"].candidates.items():
        ref = data["v"].astype(f64) @ m[:, keep].astype(f64)
        got = fake_quantize(data["v"], amax).astype(f64) @ mq
        assert choices["v"].errors[label] == pytest.approx(relative(got, ref), rel=1e-3)
    keep = _spread(40)
    assert keep is not None
    gq = fake_quantize_weight(g, 0)[keep].astype(f64)
    for label, amax in choices["u"].candidates.items():
        ref = 0.5 * data["u"].astype(f64) @ g[keep].T.astype(f64)
        got = 0.5 * fake_quantize(data["u"], amax).astype(f64) @ gq.T
        assert choices["u"].errors[label] == pytest.approx(relative(got, ref), rel=1e-3)


def test_the_table_cache_key_tells_auto_and_its_samples_apart() -> None:
    keys = {
        table_cache_key("m" * 64, "d" * 64, spec, HistogramMode.EXACT)
        for spec in (auto(), auto(samples=8), entropy(), method_spec("auto"))
    }
    assert len(keys) == 3  # method_spec("auto") is auto()


def test_the_measuring_pass_fits_a_small_memory_limit_with_the_same_result(tmp_path: Path) -> None:
    path = _conv_model(tmp_path)
    x = _wide_channel_data(12)
    dataset = CalibrationDataset.from_arrays({"x": x})
    hists = histograms_of([{"x": x}])
    results = []
    for limit in (1 << 30, 4096):  # 4 KiB: less than one sample's activations, so 1 at a time
        ranges = choose_ranges(
            path, dataset, hists, {}, auto(12), calibration_samples=12, memory_limit_bytes=limit
        )
        assert ranges.measured_samples == 12
        results.append(ranges.choices["x"])
    big, small = results
    assert small.method == big.method
    for label, error in big.errors.items():
        assert small.errors[label] == pytest.approx(error, rel=1e-4)


def test_without_quantize_linear_every_tensor_falls_back_to_its_own_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    w, b = _conv_weights()
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        "old",
        [helper.make_tensor_value_info("x", F, ["n", 16, 8, 8])],
        [helper.make_tensor_value_info("y", F, ["n", 8, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    path = _save(tmp_path, graph, opset=9)  # QuantizeLinear arrived in opset 10
    dataset = CalibrationDataset.from_arrays({"x": _wide_channel_data(8)})
    with caplog.at_level("WARNING", logger="calibrators.auto"):
        table = calibrate(path, dataset, auto())
    assert table.range_choices is not None
    assert table.range_choices["x"].criterion is RangeCriterion.TENSOR
    assert table.parameters["measured_samples"] == 0
    assert "opset 9 has no QuantizeLinear" in caplog.text
