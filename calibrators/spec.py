"""What a calibration asks for, as light types: the method and its parameters, the histogram
mode, and image preprocessing. No numpy here: the wire schemas and the HTTP client take these.

The numbers behind them live in :mod:`calibrators.methods` (histogram -> amax, one function per
method, dispatched by :func:`calibrators.amax.compute_amax`), :mod:`calibrators.histogram` and
:mod:`calibrators.images`.
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from calibrators.errors import DatasetError

__all__ = [
    "AUTO_SAMPLES_FRACTION",
    "AUTO_SAMPLES_RANGE",
    "DEFAULT_NUM_QUANT_BINS",
    "DEFAULT_PERCENTILE",
    "CalibrationMethod",
    "HistogramMode",
    "MethodSpec",
    "PreprocessSpec",
    "auto",
    "entropy",
    "method_spec",
    "minmax",
    "mse",
    "percentile",
]


DEFAULT_NUM_QUANT_BINS = 128
"""Quantization levels of |x| for signed INT8 (0..127, plus the sign)."""


DEFAULT_PERCENTILE = 99.99


AUTO_SAMPLES_FRACTION = 8


AUTO_SAMPLES_RANGE = (4, 16)
"""By default ``auto`` measures each consumer's error on an eighth of the calibration samples,
at least 4 and at most 16 (see :mod:`calibrators.auto`): a fixed share of the collection's cost."""


class CalibrationMethod(StrEnum):
    """How a histogram becomes an amax."""

    AUTO = "auto"
    ENTROPY = "entropy"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


_PARAMETERS: dict[CalibrationMethod, tuple[str, ...]] = {
    CalibrationMethod.AUTO: ("num_quant_bins", "samples"),
    CalibrationMethod.ENTROPY: ("num_quant_bins",),
    CalibrationMethod.MINMAX: (),
    CalibrationMethod.PERCENTILE: ("percentile",),
    CalibrationMethod.MSE: ("num_quant_bins",),
}
"""The parameters each method takes: a parameter given to another method is an error."""


class MethodSpec(BaseModel):
    """A calibration method and its parameters (validated; frozen; ``None`` = the default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: CalibrationMethod
    percentile: float | None = None
    """Percent of |x| kept below amax, in (0, 100]; only for ``percentile`` (default 99.99)."""
    num_quant_bins: int = DEFAULT_NUM_QUANT_BINS
    """Quantization levels of |x| (128 for INT8); only for ``entropy``, ``mse`` and ``auto``."""
    samples: int | None = None
    """Samples on which consumers' errors are measured, 1..4096; only for ``auto`` (``None``: an
    eighth of the calibration samples, between 4 and 16)."""

    @model_validator(mode="before")
    @classmethod
    def _default_percentile(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("percentile") is None
            and str(data.get("method", "")) == CalibrationMethod.PERCENTILE.value
        ):
            return {**data, "percentile": DEFAULT_PERCENTILE}
        return data

    def auto_samples(self, calibration_samples: int) -> int:
        """Samples ``auto`` measures on, given the number of calibration samples."""
        if self.samples is not None:
            return min(self.samples, max(calibration_samples, 1))
        low, high = AUTO_SAMPLES_RANGE
        share = calibration_samples // AUTO_SAMPLES_FRACTION
        return max(1, min(calibration_samples, max(low, min(high, share))))

    @field_validator("percentile")
    @classmethod
    def _check_percentile(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0.0 < value <= 100.0):
            raise ValueError(f"percentile must be in (0, 100], got {value}")
        return value

    @field_validator("num_quant_bins")
    @classmethod
    def _check_num_quant_bins(cls, value: int) -> int:
        if not 2 <= value <= 1 << 16:
            raise ValueError(f"num_quant_bins must be between 2 and 65536, got {value}")
        return value

    @field_validator("samples")
    @classmethod
    def _check_samples(cls, value: int | None) -> int | None:
        if value is not None and not 1 <= value <= 4096:
            raise ValueError(f"samples must be between 1 and 4096, got {value}")
        return value

    @model_validator(mode="after")
    def _check_applicable(self) -> MethodSpec:
        given = {
            "percentile": self.percentile is not None,
            "num_quant_bins": self.num_quant_bins != DEFAULT_NUM_QUANT_BINS,
            "samples": self.samples is not None,
        }
        for name, is_given in given.items():
            if is_given and name not in _PARAMETERS[self.method]:
                takers = [repr(m.value) for m, names in _PARAMETERS.items() if name in names]
                which = (
                    f"method {takers[0]}" if len(takers) == 1 else f"methods {', '.join(takers)}"
                )
                raise ValueError(f"{name} applies only to {which}, not {self.method.value!r}")
        return self

    @property
    def params(self) -> dict[str, float | int | str]:
        """The parameters that matter for this method (recorded in tables; unset ones left out)."""
        values = {name: getattr(self, name) for name in _PARAMETERS[self.method]}
        return {name: value for name, value in values.items() if value is not None}


def auto(samples: int | None = None, num_quant_bins: int = DEFAULT_NUM_QUANT_BINS) -> MethodSpec:
    """Per tensor, the best of entropy, minmax, percentile 99.9/99.99/99.999 and mse, judged by
    the error of the nodes reading it on ``samples`` samples (``None``: an eighth of the
    calibration samples, 4 to 16; see :mod:`calibrators.auto`)."""
    return MethodSpec(method=CalibrationMethod.AUTO, samples=samples, num_quant_bins=num_quant_bins)


def entropy(num_quant_bins: int = DEFAULT_NUM_QUANT_BINS) -> MethodSpec:
    """TensorRT EntropyCalibration2 (KL divergence)."""
    return MethodSpec(method=CalibrationMethod.ENTROPY, num_quant_bins=num_quant_bins)


def minmax() -> MethodSpec:
    """max|x| over the dataset (TensorRT MinMaxCalibration)."""
    return MethodSpec(method=CalibrationMethod.MINMAX)


def percentile(p: float = DEFAULT_PERCENTILE) -> MethodSpec:
    """The ``p``-th percentile of |x|, ``p`` in (0, 100]."""
    return MethodSpec(method=CalibrationMethod.PERCENTILE, percentile=p)


def mse(num_quant_bins: int = DEFAULT_NUM_QUANT_BINS) -> MethodSpec:
    """Minimum squared error of INT8 fake quantization."""
    return MethodSpec(method=CalibrationMethod.MSE, num_quant_bins=num_quant_bins)


def method_spec(name: str | CalibrationMethod, **params: float | int | str | None) -> MethodSpec:
    """A :class:`MethodSpec` from a method name and keyword parameters (``None`` = default).

    Raises ``ValueError`` for an unknown method or a parameter out of range or not applicable.
    """
    try:
        method = CalibrationMethod(name)
    except ValueError:
        choices = ", ".join(m.value for m in CalibrationMethod)
        raise ValueError(f"unknown calibration method {name!r}; choose one of {choices}") from None
    given = {key: value for key, value in params.items() if value is not None}
    return MethodSpec.model_validate({"method": method, **given})


class HistogramMode(StrEnum):
    """How a histogram's range is chosen."""

    EXACT = "exact"
    """numpy's histogram of |x|: 2048 bins over exactly [0, max|x| of the dataset] (two passes)."""
    TENSORRT = "tensorrt"
    """TensorRT's: range from the first batch, doubled by merging bin pairs when exceeded."""


class PreprocessSpec(BaseModel):
    """How images become model input; read from JSON with :meth:`load`.

    ``center_crop`` is a side length or ``(height, width)``. ``mean`` and ``std`` have one value
    or one per channel, in the output channel order (so BGR means are given B, G, R).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize_shorter: int | None = Field(default=None, gt=0)
    center_crop: int | tuple[int, int] | None = None
    color: Literal["RGB", "BGR"] = "RGB"
    scale: float = Field(default=1 / 255.0, gt=0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("center_crop")
    @classmethod
    def _positive_crop(cls, value: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        sides = (value,) if isinstance(value, int) else (value or ())
        if any(side <= 0 for side in sides):
            raise ValueError("center_crop sides must be positive")
        return value

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) not in (1, 3):
            raise ValueError("give one value or three (one per channel)")
        return value

    @field_validator("std")
    @classmethod
    def _nonzero_std(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v == 0 for v in value):
            raise ValueError("std values must be non-zero")
        return value

    @classmethod
    def load(cls, path: Path) -> PreprocessSpec:
        """Read a spec from a JSON file; a bad file raises :class:`DatasetError` naming it."""
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except OSError as exc:
            raise DatasetError(
                f"Cannot read preprocessing spec {str(path)!r}: {exc.strerror or exc}.",
                hint="Pass the path of an existing JSON file.",
                field="preprocess",
            ) from exc
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}"
                for err in exc.errors()
            )
            raise DatasetError(
                f"Preprocessing spec {Path(path).name!r} is invalid: {problems}.",
                hint=(
                    "Fields: resize_shorter, center_crop, color (RGB|BGR), scale, mean, std, "
                    "layout (NCHW|NHWC), dtype (float32|float16)."
                ),
                field="preprocess",
            ) from exc

    @property
    def crop_hw(self) -> tuple[int, int] | None:
        """The crop as ``(height, width)``, or None."""
        if self.center_crop is None:
            return None
        if isinstance(self.center_crop, int):
            return (self.center_crop, self.center_crop)
        return self.center_crop

    def sample_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The per-sample output shape for an image of ``height x width`` after resizing/cropping."""
        return (3, height, width) if self.layout == "NCHW" else (height, width, 3)
