"""Zip members are read lazily: shards in a zip are never read whole (stored ones in place,
deflated ones streamed), and image preprocessing is bounded in pixels before pixels are made."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import calibrators.archive as archive_module
import calibrators.sources as sources_module
from calibrators.archive import ArchiveLimits, open_member
from calibrators.data import CalibrationDataset
from calibrators.errors import ArchiveError, DatasetError
from calibrators.images import check_preprocess_size, decode_image
from calibrators.spec import PreprocessSpec
from core.tensors import TensorSpec
from tests.unit.calibrators.test_data import npz_bytes, peak_traced_bytes


def _rows(n: int, width: int, offset: int = 0) -> dict[str, np.ndarray]:
    base = np.arange(offset, offset + n, dtype=np.float32)[:, None]
    return {
        "x": base * np.ones((1, width), np.float32),
        "ids": (np.arange(offset, offset + n)[:, None] * np.ones((1, 3))).astype(np.int64),
    }


def _shard_zip(path: Path, outer: int, compressed_inner: bool, shards: int, n: int, width: int) -> Path:
    with zipfile.ZipFile(path, "w", outer) as zf:
        for i in range(shards):
            zf.writestr(f"{i:02d}.npz", npz_bytes(_rows(n, width, i * n), compressed=compressed_inner))
    return path


@pytest.mark.parametrize("outer", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
@pytest.mark.parametrize("inner", [False, True], ids=["npz", "npz-compressed"])
@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
def test_shards_in_a_zip_read_every_sample_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outer: int, inner: bool, streamed: bool
) -> None:
    if streamed:  # every deflated member streams, as members above the buffered size do
        monkeypatch.setattr(archive_module, "BUFFERED_MEMBER_BYTES", 0)
    path = _shard_zip(tmp_path / "shards.zip", outer, inner, shards=3, n=10, width=5)
    dataset = CalibrationDataset.open(path).validate(
        [TensorSpec("x", "float32", ("n", 5)), TensorSpec("ids", "int64", ("n", 3))]
    )
    batches = list(dataset.batches(4))
    x = np.concatenate([b["x"] for b in batches])
    ids = np.concatenate([b["ids"] for b in batches])
    np.testing.assert_array_equal(x, _rows(30, 5)["x"])
    np.testing.assert_array_equal(ids, _rows(30, 5)["ids"])
    # out-of-order reads (a split's subsets) are right too
    picked = dataset.subset([25, 2, 26, 11, 0])
    got = np.concatenate([b["x"][:, 0] for b in picked.batches(2)])
    np.testing.assert_array_equal(got, [25, 2, 26, 11, 0])


def test_a_large_shard_in_a_deflated_zip_is_not_read_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(archive_module, "BUFFERED_MEMBER_BYTES", 1 << 20)
    path = _shard_zip(tmp_path / "big.zip", zipfile.ZIP_DEFLATED, False, shards=1, n=256, width=16384)
    assert path.stat().st_size < 1 << 20  # 16 MB of rows, deflated to almost nothing
    sums: list[float] = []

    def drain() -> None:
        for batch in CalibrationDataset.open(path).batches(8):
            sums.append(float(batch["x"][:, 0].sum()))

    # the scan of the shard's headers, then batches of 8 samples (512 kB): not the 16 MB shard
    assert peak_traced_bytes(drain) < 4 << 20
    assert sum(sums) == float(np.arange(256).sum())


def test_open_member_reads_stored_in_place_and_streams_large_deflated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = bytes(range(256)) * 64
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("stored.bin", payload, compress_type=zipfile.ZIP_STORED)
        zf.writestr("deflated.bin", payload, compress_type=zipfile.ZIP_DEFLATED)
    limits = ArchiveLimits()
    for member in ("stored.bin", "deflated.bin"):
        for buffered in (1 << 20, 0):
            monkeypatch.setattr(archive_module, "BUFFERED_MEMBER_BYTES", buffered)
            with open_member(path, member, member, limits) as stream:
                assert stream.seekable()
                assert stream.read() == payload
                stream.seek(1000)
                assert stream.read(10) == payload[1000:1010]
                assert stream.seek(0, io.SEEK_END) == len(payload)
                assert stream.read(5) == b""
    with pytest.raises(ArchiveError, match="no longer"):
        open_member(path, "gone.bin", "gone.bin", limits)


def test_a_stored_member_whose_extent_passes_the_end_is_refused(tmp_path: Path) -> None:
    path = _shard_zip(tmp_path / "s.zip", zipfile.ZIP_STORED, False, shards=1, n=4, width=4)
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    central = data.rfind(b"PK\x01\x02", 0, end)
    # grow the declared sizes (compressed and uncompressed) in the central directory
    for offset in (20, 24):
        data[central + offset : central + offset + 4] = (10**6).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises((ArchiveError, DatasetError)):
        CalibrationDataset.open(path)


# --- images --------------------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(width * 7 + height)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def test_preprocessing_larger_than_the_pixel_limit_is_refused_from_the_spec() -> None:
    check_preprocess_size(PreprocessSpec(resize_shorter=256, center_crop=224), 224 * 224)
    with pytest.raises(DatasetError) as info:
        check_preprocess_size(PreprocessSpec(resize_shorter=8000), 4096 * 4096)
    assert info.value.field == "preprocess.resize_shorter"
    assert "64,000,000" in info.value.message
    with pytest.raises(DatasetError) as info:
        check_preprocess_size(PreprocessSpec(center_crop=(5000, 5000)), 4096 * 4096)
    assert info.value.field == "preprocess.center_crop"


def test_an_extreme_aspect_ratio_is_refused_before_resizing() -> None:
    spec = PreprocessSpec(resize_shorter=1000)  # 1000**2 pixels: within the limit
    with pytest.raises(DatasetError) as info:
        decode_image(_png(2000, 2), spec, "thin.png", max_pixels=4096 * 4096)  # -> 1000000x1000
    assert info.value.field == "preprocess.resize_shorter"
    assert "1000000x1000" in info.value.message


def test_the_decoded_sample_is_the_reference_pipeline() -> None:
    spec = PreprocessSpec(
        resize_shorter=40, center_crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), color="BGR"
    )
    data = _png(60, 50)
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((48, 40), Image.Resampling.BILINEAR)
    image = image.crop((8, 4, 40, 36))
    reference = np.asarray(image, np.float32) * np.float32(spec.scale)
    reference = reference[:, :, ::-1]
    reference = (reference - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    np.testing.assert_array_equal(decode_image(data, spec, "a.png"), reference.transpose(2, 0, 1))


def test_an_image_zip_over_the_pixel_limit_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("0.png", _png(64, 64))
    limits = ArchiveLimits(max_preprocessed_pixels=100 * 100)
    with pytest.raises(DatasetError, match="resize_shorter"):
        CalibrationDataset.open(path, preprocess=PreprocessSpec(resize_shorter=128), limits=limits)
    # without a resize the images' own size counts
    with pytest.raises(DatasetError, match="more than the limit"):
        CalibrationDataset.open(
            path, preprocess=PreprocessSpec(), limits=ArchiveLimits(max_preprocessed_pixels=1000)
        )


def test_oversized_image_files_are_refused_before_they_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources_module, "MAX_IMAGE_FILE_BYTES", 100)
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("0.png", _png(64, 64))
    with pytest.raises(ArchiveError, match="-byte file"):
        CalibrationDataset.open(path, preprocess=PreprocessSpec())
