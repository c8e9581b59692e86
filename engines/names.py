"""Names the CLI offers as choices, importable without numpy or pydantic (the CLI starts fast)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["BackendName", "QdqExecution"]


class BackendName(StrEnum):
    """A backend by name (:mod:`engines.backends.registry`), or ``auto``."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"


class QdqExecution(StrEnum):
    """How ONNX Runtime executes Q/DQ variants (:mod:`engines.variants`)."""

    ONNXRUNTIME = "onnxruntime"
    """Q/DQ fused into ONNX Runtime's integer kernels: what an onnxruntime artifact runs."""
    REFERENCE = "reference"
    """Q/DQ computed as written, in float (no graph optimizations): what TensorRT follows."""
