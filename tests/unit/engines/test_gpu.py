from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

import pytest

from engines import gpu


def _hide_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        return None if name == "pynvml" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)


def test_without_nvidia_ml_py_there_is_no_gpu_and_nothing_is_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _hide_pynvml(monkeypatch)
    assert gpu.discover_gpus() == []
    assert "pynvml" not in sys.modules


def test_nvml_that_cannot_start_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py (the gpu extra) is not installed")

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", fail)
    assert gpu.discover_gpus() == []


@pytest.mark.parametrize(
    ("number", "text"), [(12040, "12.4"), (11080, "11.8"), (13000, "13.0"), (12090, "12.9")]
)
def test_cuda_driver_versions_read_as_nvidia_smi_prints_them(number: int, text: str) -> None:
    assert gpu.format_cuda_version(number) == text


def test_gpu_info_is_a_frozen_boundary_value() -> None:
    info = gpu.GpuInfo(
        index=0,
        name="NVIDIA L4",
        compute_capability="8.9",
        memory_total_bytes=23034855424,
        driver_version="550.54.15",
        cuda_version="12.4",
    )
    assert gpu.GpuInfo.model_validate_json(info.model_dump_json()) == info
    with pytest.raises(ValueError, match="frozen"):
        info.name = "other"  # type: ignore[misc]
