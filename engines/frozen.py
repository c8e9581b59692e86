"""The pydantic bases of engines' values: immutable, JSON-serializable, unknown fields rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["FrozenModel", "FrozenReport"]


class FrozenModel(BaseModel):
    """An immutable value; a field it does not declare is an error (a typo must not pass)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class FrozenReport(FrozenModel):
    """A :class:`FrozenModel` of measurements: infinite and NaN floats are written to JSON as
    the strings ``"Infinity"``/``"NaN"`` (an SQNR can be infinite), not as ``null``."""

    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="strings")
