"""Every CUDA runtime name trtforge calls exists in the installed cuda-python.

cuda-python's runtime module imports without a GPU or driver (its calls then return
``cudaErrorInsufficientDriver``), so the names the GPU doors use are checked here, on every
machine, against the version the dev extra installs: ``cudart.X`` and ``cudart.Enum.MEMBER``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOORS = ("calibrators/tensorrt.py", "engines/backends/tensorrt_runner.py", "engines/gpu.py")
USE = re.compile(r"cudart\.(cuda\w+)(?:\.(cuda\w+))?")  # cudart.X and self._cudart.X


def _uses() -> set[tuple[str, str | None]]:
    found: set[tuple[str, str | None]] = set()
    for rel in DOORS:
        for match in USE.finditer((ROOT / rel).read_text()):
            found.add((match.group(1), match.group(2)))
    return found


def test_the_doors_use_the_cuda_runtime() -> None:
    names = {name for name, _ in _uses()}
    # the scan sees what the runner and the feeder call (a scan that finds nothing checks nothing)
    assert {"cudaMalloc", "cudaMemcpyAsync", "cudaGraphLaunch", "cudaEventQuery"} <= names


def test_every_cuda_runtime_name_exists_in_cuda_python() -> None:
    try:
        from cuda.bindings import runtime
    except ImportError:  # pragma: no cover - the dev extra installs cuda-python
        pytest.fail("cuda-python is not installed; pip install -e '.[dev]'")
    missing = []
    for name, member in sorted(_uses(), key=str):
        target = getattr(runtime, name, None)
        if target is None or (member is not None and not hasattr(target, member)):
            missing.append(f"{name}.{member}" if member else name)
    assert not missing, f"not in cuda-python's runtime module: {missing}"
