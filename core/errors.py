"""The root of trtforge's error tree, and the errors of the ground floor.

::

    TrtforgeError                   code, message, hint, field: what the API answers
    ├── ModelError                  an ONNX model cannot be loaded, is unsafe, or cannot be run
    ├── TensorRTUnavailableError    TensorRT (or cuda-python) is not installed here
    ├── CudaError                   a CUDA runtime call failed
    ├── calibrators.errors.CalibrationError   (dataset, archive, table)
    ├── engines.errors.EngineError            (spec, graph, backend, build, run, accuracy)
    └── service.errors.ServiceError           (settings, not found, conflict, upload, auth, client)

Each class's docstring is its default message. Messages say what was wrong; hints say how to fix it.
Third-party errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["CudaError", "ModelError", "TensorRTUnavailableError", "TrtforgeError"]


class TrtforgeError(Exception):
    """trtforge could not complete the request."""

    code: ClassVar[str] = "trtforge_error"
    default_hint: ClassVar[str] = ""

    def __init__(
        self, message: str | None = None, *, hint: str | None = None, field: str | None = None
    ) -> None:
        doc = (type(self).__doc__ or "").strip().splitlines()
        self.message = message if message is not None else (doc[0] if doc else type(self).__name__)
        self.hint = hint if hint is not None else self.default_hint
        self.field = field
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.message} Hint: {self.hint}" if self.hint else self.message


class ModelError(TrtforgeError):
    """The ONNX model cannot be loaded or run."""

    code = "model_invalid"
    default_hint = "Check the file with `python -m onnx.checker MODEL.onnx` or re-export it."


class TensorRTUnavailableError(TrtforgeError):
    """TensorRT is not installed on this machine."""

    code = "tensorrt_unavailable"
    default_hint = (
        "Install TensorRT from NVIDIA's index (pip install --extra-index-url https://pypi.nvidia.com "
        "tensorrt-cu12) or run in NVIDIA's TensorRT container, plus `pip install trtforge[gpu]`."
    )


class CudaError(TrtforgeError):
    """A CUDA runtime call failed."""

    code = "cuda_failed"
    default_hint = "Check that an NVIDIA GPU is visible (nvidia-smi) and has free memory."
