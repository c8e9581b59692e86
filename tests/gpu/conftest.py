"""The GPU tier: tests marked ``gpu`` need an NVIDIA GPU that cuda-python can see.

The root conftest already skips ``gpu``-marked tests where no device is visible; the ``cudart``
fixture repeats the check with trtforge's own import path (``cuda.bindings.runtime``, or
``cuda.cudart`` for cuda-python < 12.6) and hands the module to the tests.
"""

from __future__ import annotations

from typing import Any

import pytest

from core.cuda import import_cudart
from core.errors import TensorRTUnavailableError


@pytest.fixture(scope="session")
def cudart() -> Any:
    try:
        runtime = import_cudart()
    except TensorRTUnavailableError as exc:
        pytest.skip(f"cuda-python is not usable here: {exc.message}")
    err, count = runtime.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        pytest.skip(f"no CUDA device visible to cuda-python ({getattr(err, 'name', err)})")
    return runtime
