"""Image preprocessing for calibration datasets: a JSON spec and a decoder that applies it.

The steps run in a fixed order, the same order ``torchvision``-style ImageNet pipelines use:
decode (Pillow) -> RGB -> resize the shorter side (bilinear) -> center crop -> scale ->
RGB/BGR channel order -> ``(x - mean) / std`` -> layout -> dtype.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from calibrators.errors import ArchiveError, DatasetError

__all__ = ["IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "PreprocessSpec", "decode_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Member suffixes (lower case) read as images."""

MAX_IMAGE_PIXELS = 50_000_000
"""Images with more pixels are refused before they are decoded (decompression bombs)."""


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


def _open(data: bytes, label: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ArchiveError(
            f"Image {label!r} is too large to decode safely.",
            hint=f"Resize images to at most {MAX_IMAGE_PIXELS:,} pixels before packing them.",
        ) from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(
            f"Image {label!r} cannot be decoded: {exc}.",
            hint="Pack only valid JPEG or PNG files.",
        ) from exc
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ArchiveError(
            f"Image {label!r} is {width}x{height}, more than {MAX_IMAGE_PIXELS:,} pixels.",
            hint="Resize images before packing them; calibration needs only model-sized images.",
        )
    return image


def _resize_and_crop(image: Image.Image, spec: PreprocessSpec, label: str) -> Image.Image:
    if spec.resize_shorter is not None:
        width, height = image.size
        factor = spec.resize_shorter / min(width, height)
        size = (max(1, round(width * factor)), max(1, round(height * factor)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    crop = spec.crop_hw
    if crop is not None:
        width, height = image.size
        crop_h, crop_w = crop
        if width < crop_w or height < crop_h:
            raise DatasetError(
                f"Image {label!r} is {width}x{height} after resizing, smaller than the "
                f"{crop_w}x{crop_h} center crop.",
                hint="Set resize_shorter to at least the crop size in the preprocessing spec.",
            )
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    return image


def decode_image(data: bytes, spec: PreprocessSpec, label: str) -> np.ndarray:
    """Decode one JPEG/PNG file's bytes and preprocess it into one sample (no batch axis).

    ``label`` names the file in error messages. Raises :class:`DatasetError` for undecodable
    images and :class:`ArchiveError` for images too large to decode safely.
    """
    image = _open(data, label)
    try:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # what Pillow asks for before dropping the palette alpha
        image = _resize_and_crop(image.convert("RGB"), spec, label)
        pixels = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError) as exc:  # truncated or corrupt pixel data
        raise DatasetError(
            f"Image {label!r} cannot be decoded: {exc}.",
            hint="Pack only valid, complete JPEG or PNG files.",
        ) from exc
    pixels = pixels * np.float32(spec.scale)
    if spec.color == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    pixels = (pixels - mean) / std
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.dtype(spec.dtype))
