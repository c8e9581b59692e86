"""NVIDIA GPU discovery through NVML (``nvidia-ml-py``, imported as ``pynvml``).

NVML is the driver's management library: it answers without creating a CUDA context, so asking
costs milliseconds and no GPU memory. Where ``nvidia-ml-py`` is not installed, or NVML cannot
start (no driver, no GPU, a container without the driver mounted), :func:`discover_gpus` returns
an empty list: "no GPU" is an answer, not an error. Indices are NVML's (PCI bus order); CUDA
enumerates the same GPUs in that order when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["GpuInfo", "discover_gpus", "format_cuda_version"]

log = logging.getLogger(__name__)


class GpuInfo(BaseModel):
    """One NVIDIA GPU as NVML describes it."""

    model_config = ConfigDict(frozen=True)

    index: int
    name: str
    """Marketing name, e.g. ``NVIDIA H100 80GB HBM3``."""
    compute_capability: str
    """``major.minor``, e.g. ``"9.0"``."""
    memory_total_bytes: int
    driver_version: str
    cuda_version: str | None
    """The newest CUDA version the driver supports, e.g. ``"12.4"``."""
    uuid: str | None = None


def format_cuda_version(version: int) -> str:
    """NVML's CUDA driver version number as text: 12040 -> ``"12.4"``, 11080 -> ``"11.8"``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _text(value: Any) -> str:
    """NVML strings are ``bytes`` in old nvidia-ml-py releases, ``str`` in newer ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def discover_gpus() -> list[GpuInfo]:
    """Every GPU NVML sees, or ``[]`` when nvidia-ml-py is missing or NVML cannot start."""
    if importlib.util.find_spec("pynvml") is None:
        return []
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable (%s): reporting no GPU.", exc)
        return []
    try:
        return _describe_all(pynvml)
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs (%s): reporting no GPU.", exc)
        return []
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


def _describe_all(pynvml: Any) -> list[GpuInfo]:
    driver = _text(pynvml.nvmlSystemGetDriverVersion())
    try:
        cuda: str | None = format_cuda_version(int(pynvml.nvmlSystemGetCudaDriverVersion()))
    except pynvml.NVMLError:
        cuda = None
    gpus = []
    for index in range(int(pynvml.nvmlDeviceGetCount())):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        try:
            uuid: str | None = _text(pynvml.nvmlDeviceGetUUID(handle))
        except pynvml.NVMLError:
            uuid = None
        gpus.append(
            GpuInfo(
                index=index,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                compute_capability=f"{int(major)}.{int(minor)}",
                memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                driver_version=driver,
                cuda_version=cuda,
                uuid=uuid,
            )
        )
    return gpus
