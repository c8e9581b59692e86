"""engines.gpu against a real GPU: NVML's answers agree with what CUDA reports."""

from __future__ import annotations

import re
from typing import Any

import pytest

from core.cuda import cuda_call
from engines.gpu import discover_gpus

pytestmark = pytest.mark.gpu


def test_nvml_describes_every_gpu(cudart: Any) -> None:
    count = int(cuda_call(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"))
    gpus = discover_gpus()
    # NVML ignores CUDA_VISIBLE_DEVICES, so it may see more GPUs than CUDA, never fewer
    assert len(gpus) >= count >= 1, "install the gpu extra (nvidia-ml-py) on GPU machines"
    assert [g.index for g in gpus] == list(range(len(gpus)))
    for g in gpus:
        assert g.name.strip()
        assert re.fullmatch(r"\d+\.\d+", g.compute_capability)
        assert g.memory_total_bytes > 2**30
        assert re.fullmatch(r"\d+\.\d+(\.\d+)?", g.driver_version)
        assert g.cuda_version is not None and re.fullmatch(r"\d+\.\d+", g.cuda_version)


def test_nvml_and_cuda_agree_on_a_visible_gpu(cudart: Any) -> None:
    props = cuda_call(cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    name = name.rstrip("\x00")
    capability = f"{props.major}.{props.minor}"
    matches = [g for g in discover_gpus() if g.name == name and g.compute_capability == capability]
    assert matches, f"NVML lists no {name} with compute capability {capability}"
    assert abs(matches[0].memory_total_bytes - int(props.totalGlobalMem)) < 2**30
