"""The TensorRT tier: tests marked ``tensorrt`` (and ``gpu``) need TensorRT's native libraries.

``tensorrt-stubs`` (dev extra) installs a ``tensorrt`` namespace package that imports fine but is
not TensorRT, so the gate here asks trtforge's own check, which loads the real module.
"""

from __future__ import annotations

import pytest

from calibrators.table import trt_version_number
from core.errors import TensorRTUnavailableError
from core.tensorrt import require_tensorrt


@pytest.fixture(autouse=True, scope="session")
def tensorrt_version() -> int:
    """The installed TensorRT as a cache-header number (101303 = 10.13.3); skips without it."""
    try:
        version = require_tensorrt()
    except TensorRTUnavailableError as exc:
        pytest.skip(f"TensorRT is not usable here: {exc.message}")
    return trt_version_number(version)
