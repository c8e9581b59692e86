"""TensorRT 10's own calibration, fed by trtforge's native calibrator (needs TensorRT 10 + GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.data import CalibrationDataset
from calibrators.spec import CalibrationMethod
from calibrators.table import CalibrationTable, TensorRTAlgorithm
from calibrators.tensorrt import native_calibrator
from core.errors import TensorRTUnavailableError
from core.tensors import model_input_specs
from tests import zoo

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]


def _build_int8(model_path: Path, calibrator: object) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(model_path))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.INT8)
    config.int8_calibrator = calibrator
    engine = builder.build_serialized_network(network, config)
    assert engine is not None
    return bytes(engine)


@pytest.fixture
def model_and_data(tmp_path: Path) -> tuple[Path, CalibrationDataset]:
    model = zoo.tiny_cnn(batch=4)  # implicit calibration runs at the network's static shape
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    images = np.random.default_rng(0).normal(size=(20, 3, 16, 16)).astype(np.float32)
    data = CalibrationDataset.from_arrays({"image": images}).validate(model_input_specs(model))
    return path, data


def test_tensorrt_calibrates_from_the_dataset_and_the_table_is_kept(
    model_and_data: tuple[Path, CalibrationDataset], tensorrt_version: int
) -> None:
    path, data = model_and_data
    if tensorrt_version >= 110000:
        with pytest.raises(TensorRTUnavailableError, match="TensorRT 11"):
            native_calibrator(data, batch_size=4)
        return
    tables: list[CalibrationTable] = []
    with native_calibrator(
        data, TensorRTAlgorithm.MINMAX, batch_size=4, on_table=tables.append
    ) as calibrator:
        _build_int8(path, calibrator)
        calibrator.core.raise_error()
        assert calibrator.core.samples_fed == 20  # five full batches of 4
    (table,) = tables
    assert table.algorithm is TensorRTAlgorithm.MINMAX
    assert table.method is CalibrationMethod.MINMAX
    assert table.trt_version == tensorrt_version
    assert table.samples == 20 and table.dataset_sha256 == data.digest
    assert "image" in table.amax
    everything = next(iter(data.batches(20)))["image"]
    assert table.amax["image"] == pytest.approx(float(np.abs(everything).max()), rel=1e-2)

    # served back as the cache, TensorRT does not ask for a single batch
    with native_calibrator(data, TensorRTAlgorithm.MINMAX, batch_size=4, table=table) as again:
        _build_int8(path, again)
        again.core.raise_error()
        assert again.core.samples_fed == 0
