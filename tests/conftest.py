"""Shared fixtures: real models (exported once per machine, cached) and marker gating.

Tests not marked ``slow`` must stay light: around their setup and call the zoo refuses the
builders that train or export with torch (zoo.HEAVY_BUILDERS), and they may not request the
fixtures that hold such models (HEAVY_FIXTURES), even when an earlier slow test built them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Generator
from pathlib import Path

import pytest

from tests import zoo

pytest_plugins = ("pytester",)  # tests/unit/test_unit_tier_is_light.py runs the guard


def _tensorrt_importable() -> bool:
    from core.errors import TensorRTUnavailableError
    from core.tensorrt import require_tensorrt

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


HEAVY_FIXTURES = frozenset({"efficientnet_path", "minilm_path"})


def _light_reason(item: pytest.Item) -> str | None:
    """Why ``item`` may not train or export with torch, or None if it may (it is marked slow)."""
    if item.get_closest_marker("slow") is not None:
        return None
    return (
        f"{item.nodeid} is not marked slow: mark it @pytest.mark.slow, or use a model built "
        "in-process (zoo.tiny_cnn, zoo.small_cnn, zoo.tiny_two_input)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    reason = _light_reason(item)
    heavy = sorted(HEAVY_FIXTURES.intersection(item.fixturenames))
    if reason is not None and heavy:
        raise zoo.HeavyBuildRefused(
            f"fixture {', '.join(heavy)} trains or exports with torch; {reason}"
        )
    with zoo.refuse_heavy_builds(reason):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    with zoo.refuse_heavy_builds(_light_reason(item)):
        return (yield)


@pytest.fixture(scope="session")
def efficientnet_path() -> Path:
    return zoo.efficientnet_lite0()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return zoo.minilm()


@pytest.fixture(scope="session")
def tiny_cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx

    path = tmp_path_factory.mktemp("tiny") / "tiny_cnn.onnx"
    onnx.save(zoo.tiny_cnn(), path)
    return path


@pytest.fixture(scope="session")
def small_cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx

    path = tmp_path_factory.mktemp("small") / "small_cnn.onnx"
    onnx.save(zoo.small_cnn(), path)
    return path


@pytest.fixture(scope="session")
def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
