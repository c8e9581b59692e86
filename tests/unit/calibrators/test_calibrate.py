from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibrators.calibrate import calibrate, table_cache_key
from calibrators.collect import observable_tensors
from calibrators.data import CalibrationDataset
from calibrators.spec import CalibrationMethod, HistogramMode, entropy, minmax, mse, percentile
from calibrators.table import CalibrationTable
from core.hashing import sha256_file
from tests import zoo


@pytest.fixture(scope="module")
def cnn(small_cnn_path: Path) -> tuple[Path, np.ndarray]:
    return small_cnn_path, zoo.small_images(96)


def _true_max_abs(model_path: Path, images: np.ndarray, names: list[str]) -> dict[str, float]:
    model = onnx.load(str(model_path))
    for n in names:
        if n not in {o.name for o in model.graph.output} and n != "image":
            model.graph.output.append(onnx.ValueInfoProto(name=n))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = [n for n in names if n != "image"]
    out = dict(zip(wanted, session.run(wanted, {"image": images}), strict=True))
    out["image"] = images
    return {n: float(np.max(np.abs(v))) for n, v in out.items()}


def test_minmax_table_is_the_true_max_of_every_activation(cnn: tuple[Path, np.ndarray]) -> None:
    path, images = cnn
    table = calibrate(
        path, CalibrationDataset.from_arrays({"image": images}), minmax(), batch_size=32
    )
    names = list(observable_tensors(onnx.load(str(path))).tensors)
    assert list(table.amax) == names
    truth = _true_max_abs(path, images, names)
    for name in names:
        assert table.amax[name] == pytest.approx(truth[name], rel=1e-6)
    assert table.method is CalibrationMethod.MINMAX
    assert table.samples == len(images)
    assert table.model_sha256 == sha256_file(path)


@pytest.mark.parametrize(
    "method", [entropy(), percentile(99.9), mse()], ids=["entropy", "percentile", "mse"]
)
def test_histogram_methods_clip_inside_the_range(
    cnn: tuple[Path, np.ndarray], method: object
) -> None:
    path, images = cnn
    dataset = CalibrationDataset.from_arrays({"image": images})
    table = calibrate(path, dataset, method, batch_size=32)  # type: ignore[arg-type]
    ranges = calibrate(path, dataset, minmax(), batch_size=32)
    assert set(table.amax) == set(ranges.amax)
    for name, amax in table.amax.items():
        # entropy reports the chosen bin's centre, up to half a bin (of 2048) above max|x|
        assert 0 < amax <= ranges.amax[name] * (2048.5 / 2048) * (1 + 1e-6), name
    # a CNN's activations have long tails: some ranges must actually be clipped
    assert sum(table.amax[n] < 0.9 * ranges.amax[n] for n in table.amax) >= 1


def test_exact_histogram_table_ignores_batch_order_and_size(
    cnn: tuple[Path, np.ndarray],
) -> None:
    path, images = cnn
    shuffled = images[np.random.default_rng(1).permutation(len(images))]
    a = calibrate(path, CalibrationDataset.from_arrays({"image": images}), entropy(), batch_size=32)
    b = calibrate(
        path, CalibrationDataset.from_arrays({"image": shuffled}), entropy(), batch_size=7
    )
    assert a.amax == b.amax
    assert a.to_cache_text() == b.to_cache_text()


def test_tensorrt_histogram_mode_is_recorded(cnn: tuple[Path, np.ndarray]) -> None:
    path, images = cnn
    table = calibrate(
        path,
        CalibrationDataset.from_arrays({"image": images}),
        entropy(),
        histogram=HistogramMode.TENSORRT,
        batch_size=32,
    )
    assert table.parameters["histogram"] == "tensorrt"
    assert CalibrationTable.from_cache_text(table.to_cache_text()).amax.keys() == table.amax.keys()


@pytest.mark.parametrize("histogram", list(HistogramMode))
def test_a_memory_limit_below_a_batch_changes_the_runs_not_the_table(
    cnn: tuple[Path, np.ndarray], histogram: HistogramMode
) -> None:
    # 64 KiB: less than one sample's activations (~110 KB), so ONNX Runtime runs one sample at a
    # time and the tensors come in groups; tensorrt mode still decides its ranges per batch of 32.
    path, images = cnn
    data = CalibrationDataset.from_arrays({"image": images})
    runs = [
        calibrate(
            path, data, entropy(), histogram=histogram, batch_size=32, memory_limit_bytes=limit
        )
        for limit in (None, 64 * 1024)
    ]
    assert runs[0].amax == runs[1].amax
    assert runs[0].to_cache_text() == runs[1].to_cache_text()
    if histogram is HistogramMode.TENSORRT:  # the batch matters in tensorrt mode, and is kept
        other = calibrate(path, data, entropy(), histogram=histogram, batch_size=1)
        assert other.amax != runs[0].amax


def test_cache_key_changes_with_every_ingredient() -> None:
    base = table_cache_key("m", "d", entropy(), HistogramMode.EXACT)
    assert base == table_cache_key("m", "d", entropy(), HistogramMode.EXACT)
    others = {
        table_cache_key("m2", "d", entropy(), HistogramMode.EXACT),
        table_cache_key("m", "d2", entropy(), HistogramMode.EXACT),
        table_cache_key("m", "d", percentile(99.9), HistogramMode.EXACT),
        table_cache_key("m", "d", percentile(99.99), HistogramMode.EXACT),
        table_cache_key("m", "d", entropy(), HistogramMode.TENSORRT),
    }
    assert base not in others and len(others) == 5


def _relu6_model() -> onnx.ModelProto:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((4, 1, 1, 1), 1.0, np.float32), "w")
    w2 = numpy_helper.from_array(np.full((2, 4, 1, 1), 0.5, np.float32), "w2")
    lo = numpy_helper.from_array(np.array(0.0, np.float32), "lo")
    hi = numpy_helper.from_array(np.array(6.0, np.float32), "hi")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Clip", ["c", "lo", "hi"], ["r6"], name="relu6"),
            helper.make_node("Sigmoid", ["r6"], ["sig"], name="sigmoid"),
            helper.make_node("Conv", ["r6", "w2"], ["y"], name="conv2"),
        ],
        "relu6",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 8, 8]),
            helper.make_tensor_value_info("sig", TensorProto.FLOAT, ["n", 4, 8, 8]),
        ],
        [w, w2, lo, hi],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_bounded_activations_are_not_clipped_below_a_bound_the_data_reaches(tmp_path: Path) -> None:
    from calibrators.calibrate import activation_bounds

    model = _relu6_model()
    assert activation_bounds(model) == {"r6": 6.0, "sig": 1.0}
    path = tmp_path / "relu6.onnx"
    onnx.save(model, path)
    # mostly small values and a few saturated ones (0.2%): KL alone clips the spike away
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(0, 0.7, (64, 1, 8, 8))).astype(np.float32)
    x[rng.random(x.shape) < 0.002] = 50.0
    dataset = CalibrationDataset.from_arrays({"x": x})
    plain = calibrate(path, dataset, entropy(), keep_activation_bounds=False)
    kept = calibrate(path, dataset, entropy())
    assert plain.amax["r6"] < 6.0
    assert (
        kept.amax["r6"] == 6.0 and kept.amax["sig"] == plain.amax["sig"]
    )  # sigmoid never reaches 1
    assert kept.parameters["keep_activation_bounds"] == "yes"
    assert kept.amax["c"] == plain.amax["c"]  # unbounded tensors are untouched
    # a bound the data never reaches changes nothing
    small = CalibrationDataset.from_arrays(
        {"x": np.abs(rng.normal(0, 0.5, (32, 1, 8, 8))).astype(np.float32)}
    )
    assert (
        calibrate(path, small, entropy()).amax["r6"]
        == calibrate(path, small, entropy(), keep_activation_bounds=False).amax["r6"]
    )


def _alias_model(path: Path) -> Path:
    """x -> Relu r -> Transpose t -> Reshape s -> Clip(0, 1) c -> Flatten f -> Add y."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["s"]),
        helper.make_node("Clip", ["s", "lo", "hi"], ["c"]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Add", ["f", "bias"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 6], np.int64), "shape"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(1.0, np.float32), "hi"),
        numpy_helper.from_array(np.full((1, 6), 0.5, np.float32), "bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "aliases",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("method", [entropy(), minmax()], ids=["entropy", "minmax"])
def test_aliases_share_their_source_range_and_keep_graph_order(
    tmp_path: Path, method: object
) -> None:
    path = _alias_model(tmp_path / "aliases.onnx")
    plan = observable_tensors(onnx.load(str(path)))
    assert plan.aliases == {"t": "r", "s": "r", "f": "c"}  # chains resolve to the root
    x = np.random.default_rng(0).normal(0, 2, (64, 2, 3)).astype(np.float32)
    table = calibrate(
        path,
        CalibrationDataset.from_arrays({"x": x}),
        method,  # type: ignore[arg-type]
        batch_size=16,
    )
    assert list(table.amax) == ["x", "r", "t", "s", "c", "f", "y"]
    assert table.amax["t"] == table.amax["s"] == table.amax["r"]
    assert table.amax["f"] == table.amax["c"]
    if method == minmax():
        assert table.amax["r"] == pytest.approx(float(np.max(x)), rel=1e-6)
    else:  # the Clip saturates at 1 and keeps that bound; its alias keeps it too
        assert table.amax["c"] == table.amax["f"] == 1.0
