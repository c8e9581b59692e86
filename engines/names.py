"""Names the CLI offers as choices, importable without numpy or pydantic (the CLI starts fast)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["BackendName"]


class BackendName(StrEnum):
    """A backend by name (:mod:`engines.backends.registry`), or ``auto``."""

    AUTO = "auto"
    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"
