"""Real inputs and calibration tables for the graph-pass tests (computed once per session)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.table import CalibrationTable
from tests import zoo
from tests.unit.engines.graph.helpers import table_from_activations


def _tiny_images(count: int, seed: int) -> np.ndarray:
    crops = np.stack(zoo.photo_crops(count, seed=seed, size=16)).astype(np.float32)
    return ((crops / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="session")
def tiny_calibration_images() -> np.ndarray:
    return _tiny_images(24, seed=1)


@pytest.fixture(scope="session")
def tiny_eval_images() -> np.ndarray:
    return _tiny_images(16, seed=2)


@pytest.fixture(scope="session")
def tiny_table(tiny_calibration_images: np.ndarray) -> CalibrationTable:
    return table_from_activations(zoo.tiny_cnn(), {"image": tiny_calibration_images})


@pytest.fixture(scope="session")
def efficientnet(efficientnet_path: Path) -> onnx.ModelProto:
    return onnx.load(efficientnet_path)


@pytest.fixture(scope="session")
def efficientnet_eval_images() -> np.ndarray:
    return zoo.preprocess_imagenet(zoo.photo_crops(16, seed=2))


@pytest.fixture(scope="session")
def efficientnet_table(efficientnet: onnx.ModelProto) -> CalibrationTable:
    images = zoo.preprocess_imagenet(zoo.photo_crops(32, seed=1))
    return table_from_activations(efficientnet, {"input": images})


@pytest.fixture(scope="session")
def minilm(minilm_path: Path) -> onnx.ModelProto:
    return onnx.load(minilm_path)


@pytest.fixture(scope="session")
def minilm_feeds() -> dict[str, np.ndarray]:
    return zoo.minilm_inputs()


@pytest.fixture(scope="session")
def minilm_table(minilm: onnx.ModelProto) -> CalibrationTable:
    # Calibrate on the first half of the sentences; INT8 tests compare on the second half.
    return table_from_activations(minilm, zoo.minilm_inputs(zoo.SENTENCES[:16]))
