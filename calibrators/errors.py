"""The calibration error tree, and the base every trtforge error shares.

::

    TrtforgeError                   code, message, hint, field: what the API answers
    └── CalibrationError
        ├── DatasetError            a calibration dataset cannot be read or does not fit the model
        │   └── ArchiveError        an archive is unsafe (path escape, zip bomb) or unreadable
        ├── ModelError              the ONNX model cannot be loaded or run for calibration
        ├── TableError              a calibration table cannot be read, written or matched
        └── TensorRTUnavailableError  TensorRT (or cuda-python) is not installed here

Each class's docstring is its default message. Messages say what was wrong; hints say how to fix it.
Third-party errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ArchiveError",
    "CalibrationError",
    "DatasetError",
    "ModelError",
    "TableError",
    "TensorRTUnavailableError",
    "TrtforgeError",
]


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


class CalibrationError(TrtforgeError):
    """Calibration failed."""

    code = "calibration_failed"


class DatasetError(CalibrationError):
    """The calibration dataset is invalid."""

    code = "dataset_invalid"
    default_hint = "See the README's 'Calibration datasets' section for the accepted formats."


class ArchiveError(DatasetError):
    """The archive is unsafe or unreadable."""

    code = "archive_invalid"
    default_hint = "Repack the archive with relative member paths inside one folder."


class ModelError(CalibrationError):
    """The ONNX model cannot be loaded or run."""

    code = "model_invalid"
    default_hint = "Check the file with `python -m onnx.checker MODEL.onnx` or re-export it."


class TableError(CalibrationError):
    """The calibration table is invalid."""

    code = "table_invalid"
    default_hint = (
        "A TensorRT cache starts with `TRT-<version>-<Algorithm>` and has `<tensor>: <hex>` lines."
    )


class TensorRTUnavailableError(CalibrationError):
    """TensorRT is not installed on this machine."""

    code = "tensorrt_unavailable"
    default_hint = (
        "Install TensorRT from NVIDIA's index (pip install --extra-index-url https://pypi.nvidia.com "
        "tensorrt-cu12) or run in NVIDIA's TensorRT container, plus `pip install trtforge[gpu]`."
    )
