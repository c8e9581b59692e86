"""The build child's memory limit (``RLIMIT_DATA``, :func:`service.worker.runner.limit_memory`)
leaves CUDA working: the driver's reserved address space is not data memory, so a GPU build runs
under a limit far below the address space CUDA maps."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = """
from service.worker.runner import limit_memory
limit_memory(2 << 30)
from core.cuda import import_cudart
rt = import_cudart()
err, = rt.cudaFree(0)[:1]
assert int(err) == 0, err
err, device = rt.cudaMalloc(1 << 30)
assert int(err) == 0, err
err, host = rt.cudaMallocHost(256 << 20)
assert int(err) == 0, err
rt.cudaFreeHost(host)
rt.cudaFree(device)
import numpy as np
try:
    np.ones(3 << 30, np.uint8)
except MemoryError:
    print("limited")
"""


def test_cuda_initializes_and_allocates_under_the_build_memory_limit(cudart: Any) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "limited"  # host allocations over the limit still fail
