from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibrators.calibrate import calibrate, sha256_file, table_cache_key
from calibrators.collect import observable_tensors
from calibrators.data import CalibrationDataset
from calibrators.histogram import HistogramMode
from calibrators.methods import CalibrationMethod, entropy, minmax, mse, percentile
from calibrators.table import CalibrationTable
from tests import zoo


@pytest.fixture(scope="module")
def fashion() -> tuple[Path, np.ndarray]:
    images, _ = zoo.fashion_mnist("test")
    return zoo.fashion_cnn(), images[:96]


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


def test_minmax_table_is_the_true_max_of_every_activation(fashion: tuple[Path, np.ndarray]) -> None:
    path, images = fashion
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
    fashion: tuple[Path, np.ndarray], method: object
) -> None:
    path, images = fashion
    dataset = CalibrationDataset.from_arrays({"image": images})
    table = calibrate(path, dataset, method, batch_size=32)  # type: ignore[arg-type]
    ranges = calibrate(path, dataset, minmax(), batch_size=32)
    assert set(table.amax) == set(ranges.amax)
    for name, amax in table.amax.items():
        # entropy reports the chosen bin's centre, up to half a bin (of 2048) above max|x|
        assert 0 < amax <= ranges.amax[name] * (2048.5 / 2048) * (1 + 1e-6), name
    # a real CNN's activations have long tails: some ranges must actually be clipped
    assert sum(table.amax[n] < 0.9 * ranges.amax[n] for n in table.amax) >= 1


def test_exact_histogram_table_ignores_batch_order_and_size(
    fashion: tuple[Path, np.ndarray],
) -> None:
    path, images = fashion
    shuffled = images[np.random.default_rng(1).permutation(len(images))]
    a = calibrate(path, CalibrationDataset.from_arrays({"image": images}), entropy(), batch_size=32)
    b = calibrate(
        path, CalibrationDataset.from_arrays({"image": shuffled}), entropy(), batch_size=7
    )
    assert a.amax == b.amax
    assert a.to_cache_text() == b.to_cache_text()


def test_tensorrt_histogram_mode_is_recorded(fashion: tuple[Path, np.ndarray]) -> None:
    path, images = fashion
    table = calibrate(
        path,
        CalibrationDataset.from_arrays({"image": images}),
        entropy(),
        histogram=HistogramMode.TENSORRT,
        batch_size=32,
    )
    assert table.parameters["histogram"] == "tensorrt"
    assert CalibrationTable.from_cache_text(table.to_cache_text()).amax.keys() == table.amax.keys()


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
