"""Shared fixtures: real models (exported once per machine, cached) and marker gating."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests import zoo


def _tensorrt_importable() -> bool:
    from calibrators.errors import TensorRTUnavailableError
    from calibrators.tensorrt import require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailableError:
        return False
    return True


def _gpu_present() -> bool:
    if importlib.util.find_spec("cuda") is None:
        return False
    try:
        from cuda.bindings import runtime as cudart
    except Exception:
        return False
    err, count = cudart.cudaGetDeviceCount()
    return int(err) == 0 and count > 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gates = {
        "tensorrt": (_tensorrt_importable, "TensorRT's native libraries are not installed here"),
        "gpu": (_gpu_present, "no NVIDIA GPU visible to cuda-python here"),
    }
    cache: dict[str, bool] = {}
    for item in items:
        for marker, (probe, reason) in gates.items():
            # the marker itself, not a keyword: a parameter id such as [tensorrt] is a keyword too
            if item.get_closest_marker(marker) is not None:
                if marker not in cache:
                    cache[marker] = probe()
                if not cache[marker]:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def efficientnet_path() -> Path:
    return zoo.efficientnet_lite0()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return zoo.minilm()


@pytest.fixture(scope="session")
def fashion_cnn_path() -> Path:
    return zoo.fashion_cnn()


@pytest.fixture(scope="session")
def tiny_cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx

    path = tmp_path_factory.mktemp("tiny") / "tiny_cnn.onnx"
    onnx.save(zoo.tiny_cnn(), path)
    return path


@pytest.fixture(scope="session")
def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
