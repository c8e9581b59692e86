"""The calibration error tree (its root, :class:`core.errors.TrtforgeError`, is on the ground floor).

::

    CalibrationError
    ├── DatasetError            a calibration dataset cannot be read or does not fit the model
    │   └── ArchiveError        an archive is unsafe (path escape, zip bomb) or unreadable
    └── TableError              a calibration table cannot be read, written or matched

Each class's docstring is its default message. Messages say what was wrong; hints say how to fix it.
Third-party errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from core.errors import TrtforgeError

__all__ = ["ArchiveError", "CalibrationError", "DatasetError", "TableError"]


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


class TableError(CalibrationError):
    """The calibration table is invalid."""

    code = "table_invalid"
    default_hint = (
        "A TensorRT cache starts with `TRT-<version>-<Algorithm>` and has `<tensor>: <hex>` lines."
    )
