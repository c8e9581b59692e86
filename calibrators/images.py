"""Image preprocessing for calibration datasets: a JSON spec and a decoder that applies it.

The steps run in a fixed order, the same order ``torchvision``-style ImageNet pipelines use:
decode (Pillow) -> RGB -> resize the shorter side (bilinear) -> center crop -> scale ->
RGB/BGR channel order -> ``(x - mean) / std`` -> layout -> dtype.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from calibrators.errors import ArchiveError, DatasetError
from calibrators.spec import PreprocessSpec

__all__ = ["IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "decode_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Member suffixes (lower case) read as images."""

MAX_IMAGE_PIXELS = 50_000_000
"""Images with more pixels are refused before they are decoded (decompression bombs)."""


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
