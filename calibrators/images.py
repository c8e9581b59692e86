"""Image preprocessing for calibration datasets: a JSON spec and a decoder that applies it.

The steps run in a fixed order, the same order ``torchvision``-style ImageNet pipelines use:
decode (Pillow) -> RGB -> resize the shorter side (bilinear) -> center crop -> scale ->
RGB/BGR channel order -> ``(x - mean) / std`` -> layout -> dtype.

Sizes are bounded before pixels are made: an image of more than :data:`MAX_IMAGE_PIXELS` is not
decoded, and one whose resized (and cropped) size exceeds ``max_pixels`` is not resized, so a
small image with a large ``resize_shorter`` cannot take gigabytes.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from calibrators.errors import ArchiveError, DatasetError
from calibrators.spec import PreprocessSpec

__all__ = [
    "DEFAULT_MAX_PREPROCESSED_PIXELS",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_FILE_BYTES",
    "MAX_IMAGE_PIXELS",
    "check_preprocess_size",
    "decode_image",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Member suffixes (lower case) read as images."""

MAX_IMAGE_PIXELS = 50_000_000
"""Images with more pixels are refused before they are decoded (decompression bombs)."""

MAX_IMAGE_FILE_BYTES = 256 << 20
"""Image files larger than this are refused before they are read."""

DEFAULT_MAX_PREPROCESSED_PIXELS = 4096 * 4096
"""Pixels of one sample after resizing and cropping, unless the caller says otherwise."""


def check_preprocess_size(spec: PreprocessSpec, max_pixels: int) -> None:
    """Refuse a spec whose output cannot fit ``max_pixels`` whatever the images.

    A crop is the output: its area must fit. A shorter side of ``resize_shorter`` makes at least
    its square: that must fit too, or, when a crop follows, :data:`MAX_IMAGE_PIXELS`.
    """
    crop = spec.crop_hw
    if crop is not None and crop[0] * crop[1] > max_pixels:
        raise DatasetError(
            f"center_crop {crop[0]}x{crop[1]} has {crop[0] * crop[1]:,} pixels, more than the "
            f"limit of {max_pixels:,}.",
            hint="Crop to the model's input size.",
            field="preprocess.center_crop",
        )
    resized_limit = max_pixels if crop is None else max(max_pixels, MAX_IMAGE_PIXELS)
    if spec.resize_shorter is not None and spec.resize_shorter**2 > resized_limit:
        raise DatasetError(
            f"resize_shorter {spec.resize_shorter:,} makes images of at least "
            f"{spec.resize_shorter**2:,} pixels, more than the limit of {resized_limit:,}.",
            hint="Resize to the model's input size (e.g. 256 with a 224 center crop).",
            field="preprocess.resize_shorter",
        )


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


def _resize_and_crop(
    image: Image.Image, spec: PreprocessSpec, label: str, max_pixels: int
) -> Image.Image:
    width, height = image.size
    if spec.resize_shorter is not None:
        factor = spec.resize_shorter / min(width, height)
        width, height = max(1, round(width * factor)), max(1, round(height * factor))
    crop = spec.crop_hw
    kept = (min(width, crop[1]) * min(height, crop[0])) if crop is not None else width * height
    # the resized image exists before it is cropped: bound both
    if width * height > max(max_pixels, MAX_IMAGE_PIXELS) or kept > max_pixels:
        raise DatasetError(
            f"Image {label!r} is {image.size[0]}x{image.size[1]}; preprocessing makes it "
            f"{width}x{height}, more than the limit of {max_pixels:,} pixels.",
            hint="Use a smaller resize_shorter (or a center_crop), or pack images with a "
            "less extreme aspect ratio.",
            field="preprocess.resize_shorter",
        )
    if (width, height) != image.size:
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    if crop is not None:
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


def decode_image(
    data: bytes,
    spec: PreprocessSpec,
    label: str,
    max_pixels: int = DEFAULT_MAX_PREPROCESSED_PIXELS,
) -> np.ndarray:
    """Decode one JPEG/PNG file's bytes and preprocess it into one sample (no batch axis).

    ``label`` names the file in error messages. Raises :class:`DatasetError` for undecodable
    images or a preprocessed size over ``max_pixels``, and :class:`ArchiveError` for images too
    large to decode safely.
    """
    image = _open(data, label)
    try:
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # what Pillow asks for before dropping the palette alpha
        image = _resize_and_crop(image.convert("RGB"), spec, label, max_pixels)
        pixels = np.asarray(image, dtype=np.float32)
    except (OSError, ValueError) as exc:  # truncated or corrupt pixel data
        raise DatasetError(
            f"Image {label!r} cannot be decoded: {exc}.",
            hint="Pack only valid, complete JPEG or PNG files.",
        ) from exc
    del image
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    # in place: one float copy of the image at a time
    pixels *= np.float32(spec.scale)
    if spec.color == "BGR":
        pixels = pixels[:, :, ::-1]
    pixels -= np.asarray(spec.mean, dtype=np.float32)
    pixels /= np.asarray(spec.std, dtype=np.float32)
    if spec.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.dtype(spec.dtype))
