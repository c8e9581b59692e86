"""How ``trtforge workers`` names a worker's targets (the commands run against a real server in
tests/integration/test_cli.py)."""

from __future__ import annotations

from engines.backends.base import BuildTarget
from service.cli.builds import _target_text


def test_a_target_is_named_by_its_device_with_the_gpus_compute_capability() -> None:
    cpu = BuildTarget(backend="onnxruntime", backend_version="1.22.0", compute_capability="cpu")
    assert _target_text(cpu) == "onnxruntime 1.22.0 on cpu"
    gpu = BuildTarget(
        backend="tensorrt",
        backend_version="10.13.0",
        compute_capability="9.0",
        device="NVIDIA H100 80GB HBM3",
    )
    assert _target_text(gpu) == "tensorrt 10.13.0 on NVIDIA H100 80GB HBM3 (sm 9.0)"
    unnamed = BuildTarget(backend="tensorrt", backend_version="10.13.0", compute_capability="8.9")
    assert _target_text(unnamed) == "tensorrt 10.13.0 on sm 8.9"
