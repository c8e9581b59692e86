"""External data is read from the model's own folder in every calibration step, never from the
working directory (a same-named file planted there is never read)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibrators.calibrate import activation_bounds, calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import auto, entropy, minmax


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _relu6_with_external_data(folder: Path, hi: float = 6.0) -> Path:
    """x -> Conv(w) -> Clip(lo, hi) -> Conv(w2) -> y, every initializer in ``w.bin``."""
    tensors = [
        numpy_helper.from_array(np.full((4, 1, 1, 1), 1.0, np.float32), "w"),
        numpy_helper.from_array(np.full((2, 4, 1, 1), 0.5, np.float32), "w2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(hi, np.float32), "hi"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
            helper.make_node("Clip", ["c", "lo", "hi"], ["r6"], name="relu6"),
            helper.make_node("Conv", ["r6", "w2"], ["y"], name="conv2"),
        ],
        "relu6",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 8, 8])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(
        model, path, save_as_external_data=True, location="w.bin", size_threshold=0
    )
    assert (folder / "w.bin").is_file()
    return path


def _dataset() -> CalibrationDataset:
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(0, 0.7, (32, 1, 8, 8))).astype(np.float32)
    x[rng.random(x.shape) < 0.01] = 50.0  # saturates the Clip: its bound decides r6's range
    return CalibrationDataset.from_arrays({"x": x})


@pytest.mark.parametrize("method", [minmax(), entropy(), auto()], ids=["minmax", "entropy", "auto"])
def test_calibration_reads_external_data_from_the_model_folder(
    tmp_path: Path, method: object
) -> None:
    model = _relu6_with_external_data(tmp_path / "model")
    dataset = _dataset()
    with _cwd(model.parent):
        expected = calibrate(model, dataset, method)  # type: ignore[arg-type]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with _cwd(elsewhere):  # no w.bin here
        assert calibrate(model, dataset, method).amax == expected.amax  # type: ignore[arg-type]
    # a w.bin of other weights (a Clip bound of 2, other convolutions) in the working directory
    planted = tmp_path / "planted"
    _relu6_with_external_data(planted, hi=2.0)
    (planted / "model.onnx").unlink()
    assert (planted / "w.bin").read_bytes() != (model.parent / "w.bin").read_bytes()
    with _cwd(planted):
        assert calibrate(model, dataset, method).amax == expected.amax  # type: ignore[arg-type]
    if method != minmax():
        assert expected.amax["r6"] >= 6.0  # the bound came from the model's own w.bin (not 2)


def test_activation_bounds_without_the_folder_leave_external_bounds_unknown(tmp_path: Path) -> None:
    model_path = _relu6_with_external_data(tmp_path / "m")
    model = onnx.load(str(model_path), load_external_data=False)
    with _cwd(model_path.parent):  # even where a w.bin would be found
        assert activation_bounds(model) == {}
    assert activation_bounds(model, model_path.parent) == {"r6": 6.0}
