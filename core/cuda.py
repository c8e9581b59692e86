"""The door to the CUDA runtime through cuda-python, imported inside functions only."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from core.errors import CudaError, TensorRTUnavailableError

__all__ = ["CUDA_PYTHON_HINT", "cuda_call", "import_cudart"]

CUDA_PYTHON_HINT = "Install cuda-python: pip install 'trtforge[gpu]' (or pip install cuda-python)."


def import_cudart() -> Any:
    """cuda-python's CUDA runtime module (``cuda.bindings.runtime``, or ``cuda.cudart`` < 12.6)."""
    if importlib.util.find_spec("cuda") is None:
        raise TensorRTUnavailableError("cuda-python is not installed.", hint=CUDA_PYTHON_HINT)
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise TensorRTUnavailableError(
                f"cuda-python cannot be imported: {exc}", hint=CUDA_PYTHON_HINT
            ) from exc
    return cudart


def cuda_call(result: Any, what: str, error: Callable[..., Exception] = CudaError) -> Any:
    """Check one cuda-python call: every runtime call returns ``(err, *values)``.

    Returns the single value (or the tuple of values, or None); raises ``error`` naming the call
    and CUDA's error name otherwise.
    """
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise error(
            f"CUDA call {what} failed: {getattr(err, 'name', err)} ({int(err)}).",
            hint="Check that an NVIDIA GPU is visible (nvidia-smi) and has free memory.",
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
