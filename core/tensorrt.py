"""The door to TensorRT: whether it is installed, and importing it (only here and in the backend).

``tensorrt`` is imported inside functions only, so this module imports anywhere.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from core.errors import TensorRTUnavailableError

__all__ = ["require_tensorrt", "tensorrt_installed", "tensorrt_module"]


def tensorrt_installed() -> bool:
    """Whether a real ``tensorrt`` package is installed (found without importing it).

    ``tensorrt-stubs`` installs a bare ``tensorrt/__init__.pyi``, which Python finds as a
    namespace package; that is not TensorRT, so a spec without an origin does not count.
    """
    try:
        spec = importlib.util.find_spec("tensorrt")
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is not None


def require_tensorrt() -> str:
    """Import TensorRT or raise :class:`TensorRTUnavailableError`; returns its version."""
    if not tensorrt_installed():
        raise TensorRTUnavailableError("TensorRT (the `tensorrt` Python package) is not installed.")
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # the bindings without their native libraries
        raise TensorRTUnavailableError(
            f"The `tensorrt` package is installed but cannot load TensorRT's libraries: {exc}"
        ) from exc
    return str(trt.__version__)


def tensorrt_module() -> Any:
    """The ``tensorrt`` module, imported here so that this file and the backend stay its only doors."""
    require_tensorrt()
    import tensorrt as trt

    return trt
