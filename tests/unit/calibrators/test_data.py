"""CalibrationDataset: formats, validation, archive safety, digests, laziness, splits."""

from __future__ import annotations

import io
import itertools
import json
import stat
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from PIL import Image

import calibrators.data as data_module
from calibrators.data import ArchiveLimits, CalibrationDataset
from calibrators.errors import ArchiveError, DatasetError
from calibrators.spec import PreprocessSpec
from core.tensors import TensorSpec, model_input_specs
from tests import zoo

TWO_INPUT_SPECS = [
    TensorSpec("x", "float32", ("batch", 4)),
    TensorSpec("ids", "int64", ("batch", 3)),
]


def two_input_arrays(n: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, 4)).astype(np.float32),
        "ids": rng.integers(0, 20, size=(n, 3)).astype(np.int64),
    }


def collect(dataset: CalibrationDataset, batch_size: int = 4) -> dict[str, np.ndarray]:
    batches = list(dataset.batches(batch_size))
    return {name: np.concatenate([b[name] for b in batches]) for name in dataset.names}


def npz_bytes(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, payload in members.items():
            zf.writestr(zipfile.ZipInfo(name), payload, compress_type=compression)
    return path


def shards_of(arrays: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    bounds = np.cumsum([0, *sizes])
    return [{k: v[a:b] for k, v in arrays.items()} for a, b in itertools.pairwise(bounds)]


# --- containers ----------------------------------------------------------------------------------


def make_npz(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(tmp / "data.npz", **arrays)
    return tmp / "data.npz"


def make_npz_compressed(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez_compressed(tmp / "data.npz", **arrays)
    return tmp / "data.npz"


def make_shard_dir(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder = tmp / "shards"
    folder.mkdir()
    for i, shard in enumerate(shards_of(arrays, [3, 4, 3])):
        np.savez(folder / f"part-{i:02d}.npz", **shard)
    (folder / "README.txt").write_text("ignored")
    return folder


def make_shard_zip(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    # Written out of order: the dataset must sort by member name.
    shards = shards_of(arrays, [2, 5, 3])
    members = {
        f"s/{i}.npz": npz_bytes(s, compressed=i == 1) for i, s in reversed(list(enumerate(shards)))
    }
    return write_zip(tmp / "shards.zip", members, zipfile.ZIP_DEFLATED)


def make_npy_dir(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    folder = tmp / "arrays"
    folder.mkdir()
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
    return folder


def make_npy_zip(tmp: Path, arrays: dict[str, np.ndarray]) -> Path:
    return write_zip(tmp / "arrays.zip", {f"{k}.npy": npy_bytes(v) for k, v in arrays.items()})


CONTAINERS: dict[str, Callable[[Path, dict[str, np.ndarray]], Path]] = {
    "npz": make_npz,
    "npz-compressed": make_npz_compressed,
    "shard-dir": make_shard_dir,
    "shard-zip": make_shard_zip,
    "npy-dir": make_npy_dir,
    "npy-zip": make_npy_zip,
}


@pytest.mark.parametrize("kind", sorted(CONTAINERS))
def test_every_container_reads_the_same_samples_and_digest(tmp_path: Path, kind: str) -> None:
    arrays = two_input_arrays()
    dataset = CalibrationDataset.open(CONTAINERS[kind](tmp_path, arrays))
    assert dataset.names == ("ids", "x")
    assert len(dataset) == dataset.num_samples == 10
    assert dataset.specs == (TensorSpec("ids", "int64", (3,)), TensorSpec("x", "float32", (4,)))
    got = collect(dataset, batch_size=4)
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], array)
    assert [len(b["x"]) for b in dataset.batches(4)] == [4, 4, 2]
    assert dataset.digest == CalibrationDataset.from_arrays(arrays).digest


def test_digest_follows_content_not_container(tmp_path: Path) -> None:
    arrays = two_input_arrays()
    base = CalibrationDataset.from_arrays(arrays)
    changed = {**arrays, "x": arrays["x"].copy()}
    changed["x"][9, 3] += 1
    swapped = {"x": arrays["x"][::-1].copy(), "ids": arrays["ids"][::-1].copy()}
    assert CalibrationDataset.from_arrays(changed).digest != base.digest
    assert CalibrationDataset.from_arrays(swapped).digest != base.digest
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in arrays.items()}
    path = tmp_path / "be.npz"
    np.savez(path, **big_endian)
    opened = CalibrationDataset.open(path)
    assert opened.specs == base.specs
    assert opened.digest == base.digest
    assert len(base.digest) == 64 and int(base.digest, 16) >= 0


def test_single_npy_takes_its_name_from_input_name_or_the_model(tmp_path: Path) -> None:
    images = np.random.default_rng(1).normal(size=(6, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "calib.npy", images)
    model_inputs = model_input_specs(zoo.tiny_cnn())
    dataset = CalibrationDataset.open(tmp_path / "calib.npy")
    assert dataset.names == ("calib",)
    validated = dataset.validate(model_inputs)
    assert validated.names == ("image",)
    np.testing.assert_array_equal(collect(validated)["image"], images)
    assert validated.digest == CalibrationDataset.from_arrays({"image": images}).digest
    named = CalibrationDataset.open(tmp_path / "calib.npy", input_name="pixels")
    assert named.names == ("pixels",)
    with pytest.raises(DatasetError, match="missing 'image'"):
        named.validate(model_inputs)


def test_single_npy_for_a_multi_input_model_asks_for_a_name(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(DatasetError, match="missing 'ids'") as info:
        CalibrationDataset.open(tmp_path / "x.npy", input_name="x").validate(TWO_INPUT_SPECS)
    assert "x" not in info.value.message.split("missing")[1]
    np.save(tmp_path / "lone.npy", np.zeros((2, 4), np.float32))
    with pytest.raises(DatasetError) as info:
        CalibrationDataset.open(tmp_path / "lone.npy").validate(TWO_INPUT_SPECS)
    assert "input_name" in info.value.hint


# --- images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    return zoo.photo_crops(4, seed=3, size=160)


def test_png_zip_matches_the_reference_imagenet_preprocessing(
    tmp_path: Path, crops: list[np.ndarray]
) -> None:
    path = zoo.images_zip(crops, tmp_path / "images.zip", fmt="PNG")
    spec_path = tmp_path / "pre.json"
    spec_path.write_text(json.dumps(zoo.IMAGENET_PREPROCESS))
    spec = PreprocessSpec.load(spec_path)
    dataset = CalibrationDataset.open(path, preprocess=spec)
    assert dataset.specs == (TensorSpec("input", "float32", (3, 224, 224)),)
    expected = zoo.preprocess_imagenet(crops)
    got = collect(dataset, batch_size=3)["input"]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    validated = dataset.validate([TensorSpec("pixel_values", "float32", ("N", 3, 224, 224))])
    assert validated.names == ("pixel_values",)
    assert validated.digest == CalibrationDataset.from_arrays({"pixel_values": got}).digest


def test_bgr_nhwc_float16_preprocessing(tmp_path: Path, crops: list[np.ndarray]) -> None:
    path = zoo.images_zip(crops[:2], tmp_path / "images.zip", fmt="PNG")
    params = dict(zoo.IMAGENET_PREPROCESS)
    params.update(color="BGR", layout="NHWC", dtype="float16")
    params["mean"] = list(reversed(params["mean"]))
    params["std"] = list(reversed(params["std"]))
    dataset = CalibrationDataset.open(path, preprocess=PreprocessSpec(**params), input_name="img")
    got = collect(dataset)["img"]
    assert got.dtype == np.float16 and got.shape == (2, 224, 224, 3)
    reference = zoo.preprocess_imagenet(crops[:2]).transpose(0, 2, 3, 1)[..., ::-1]
    np.testing.assert_allclose(got.astype(np.float32), reference, atol=1e-2)


def test_jpeg_zip_decodes_in_sorted_member_order(tmp_path: Path, crops: list[np.ndarray]) -> None:
    path = zoo.images_zip(crops, tmp_path / "images.zip", fmt="JPEG")
    dataset = CalibrationDataset.open(path, preprocess=PreprocessSpec(**zoo.IMAGENET_PREPROCESS))
    got = collect(dataset)["input"]
    expected = zoo.preprocess_imagenet(crops)
    errors = np.abs(got[:, None] - expected[None]).mean(axis=(2, 3, 4))  # [decoded, reference]
    assert errors.argmin(axis=1).tolist() == [0, 1, 2, 3]
    assert errors.diagonal().max() < 0.1  # JPEG is lossy; the references differ by ~1


def test_image_zip_errors(tmp_path: Path, crops: list[np.ndarray]) -> None:
    path = zoo.images_zip(crops[:2], tmp_path / "images.zip", fmt="PNG")
    with pytest.raises(DatasetError, match="no preprocessing spec"):
        CalibrationDataset.open(path)
    np.savez(tmp_path / "a.npz", x=np.zeros((1, 2), np.float32))
    with pytest.raises(DatasetError, match="holds arrays, not images"):
        CalibrationDataset.open(tmp_path / "a.npz", preprocess=PreprocessSpec())
    sizes = [crops[0], crops[1][:100]]
    mixed = zoo.images_zip(sizes, tmp_path / "mixed.zip", fmt="PNG")
    dataset = CalibrationDataset.open(mixed, preprocess=PreprocessSpec())
    assert dataset.specs[0].shape == (3, 160, 160)
    with pytest.raises(DatasetError, match=r"00001\.png"):
        list(dataset.batches(2))
    broken = write_zip(tmp_path / "broken.zip", {"a.png": b"\x89PNG not really"})
    lazy = CalibrationDataset.open(broken, preprocess=PreprocessSpec(center_crop=8))
    with pytest.raises(DatasetError, match=r"broken\.zip:a\.png"):
        list(lazy.batches(1))  # decoded only when a batch needs it
    with pytest.raises(DatasetError, match=r"broken\.zip:a\.png"):
        CalibrationDataset.open(broken, preprocess=PreprocessSpec())  # no crop: decodes the first


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("side", [8000, 20000])
def test_images_claiming_huge_sizes_are_refused_before_decoding(tmp_path: Path, side: int) -> None:
    data = bytearray(png_bytes(Image.new("RGB", (4, 4))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    path = write_zip(tmp_path / "huge.zip", {"big.png": bytes(data)})
    with pytest.raises(ArchiveError, match=r"huge\.zip:big\.png"):
        CalibrationDataset.open(path, preprocess=PreprocessSpec())


def test_palette_png_with_transparency_decodes(tmp_path: Path) -> None:
    palette = Image.new("P", (20, 10), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = bytes([0, 128] + [255] * 254)  # kept as bytes in the PNG
    path = write_zip(tmp_path / "p.zip", {"p.png": png_bytes(palette)})
    spec = PreprocessSpec(scale=1.0, layout="NHWC")
    dataset = CalibrationDataset.open(path, preprocess=spec)
    sample = next(dataset.batches(1))["input"][0]
    assert sample.shape == (10, 20, 3)
    np.testing.assert_array_equal(sample[0, 0], [255, 0, 0])


def test_preprocess_spec_load_reports_bad_fields(tmp_path: Path) -> None:
    bad = tmp_path / "pre.json"
    bad.write_text(json.dumps({"mean": [1, 2], "layot": "NCHW"}))
    with pytest.raises(DatasetError, match=r"pre\.json") as info:
        PreprocessSpec.load(bad)
    assert "mean" in info.value.message and "layot" in info.value.message
    with pytest.raises(DatasetError, match="Cannot read"):
        PreprocessSpec.load(tmp_path / "missing.json")


# --- validation ------------------------------------------------------------------------------------


def test_validate_two_input_model_casts_and_digests_the_cast_data() -> None:
    arrays = two_input_arrays()
    wide = {"x": arrays["x"].astype(np.float64), "ids": arrays["ids"].astype(np.int32)}
    specs = model_input_specs(zoo.tiny_two_input())
    validated = CalibrationDataset.from_arrays(wide).validate(specs)
    assert validated.specs == (TensorSpec("ids", "int64", (3,)), TensorSpec("x", "float32", (4,)))
    batch = next(validated.batches(16))
    assert batch["x"].dtype == np.float32 and batch["ids"].dtype == np.int64
    assert validated.digest == CalibrationDataset.from_arrays(arrays).digest
    assert (
        validated.split(0.2)[0].digest
        == CalibrationDataset.from_arrays(arrays).split(0.2)[0].digest
    )


def test_names_must_match_listing_missing_and_extra() -> None:
    arrays = two_input_arrays()
    dataset = CalibrationDataset.from_arrays({"x": arrays["x"], "tokens": arrays["ids"]})
    with pytest.raises(DatasetError) as info:
        dataset.validate(TWO_INPUT_SPECS)
    assert "missing 'ids'" in info.value.message and "'tokens'" in info.value.message
    assert "ids, x" in info.value.hint


def test_wider_floats_round_to_nearest_with_a_warning_and_overflow_is_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    precise = np.full((3, 4), 1.0 + 2.0**-40, np.float64)  # not representable in float32
    with caplog.at_level("WARNING", logger="calibrators.data"):
        validated = CalibrationDataset.from_arrays({"x": precise}).validate(
            [TensorSpec("x", "float32", ("b", 4))]
        )
    assert [r.getMessage() for r in caplog.records] == [
        "Input 'x': float64 samples are rounded to the model's float32 (to nearest; ranges "
        "change by at most its precision, 6.0e-08 relative)."
    ]
    assert np.array_equal(next(validated.batches(3))["x"], np.ones((3, 4), np.float32))
    huge = np.zeros((3, 4), np.float64)
    huge[2, 1] = 1e300  # overflows float32: refused, naming the sample
    with pytest.raises(DatasetError, match="'x'") as info:
        CalibrationDataset.from_arrays({"x": huge}).validate([TensorSpec("x", "float32", ("b", 4))])
    assert "sample 2 holds values beyond float32" in info.value.message


@pytest.mark.parametrize(
    ("values", "target"),
    [
        (np.zeros((3, 4), np.float32), "int64"),
        (np.zeros((3, 4), np.float64), "int32"),
        (np.zeros((3, 4), np.float32), "bool"),
    ],
)
def test_lossy_dtype_casts_are_refused(values: np.ndarray, target: str) -> None:
    dataset = CalibrationDataset.from_arrays({"tokens": values})
    with pytest.raises(DatasetError, match="'tokens'") as info:
        dataset.validate([TensorSpec("tokens", target, ("b", 4))])
    assert target in info.value.message and "lose information" in info.value.message


def test_integer_narrowing_is_checked_value_by_value() -> None:
    ok = np.arange(12, dtype=np.int64).reshape(4, 3)
    spec = [TensorSpec("ids", "int32", (None, 3))]
    validated = CalibrationDataset.from_arrays({"ids": ok}).validate(spec)
    assert next(validated.batches(4))["ids"].dtype == np.int32
    too_big = ok.copy()
    too_big[2, 1] = 2**40
    with pytest.raises(DatasetError, match=r"'ids' sample 2 .*int32"):
        CalibrationDataset.from_arrays({"ids": too_big}).validate(spec)
    flags = np.array([[True], [False]])
    assert CalibrationDataset.from_arrays({"m": flags}).validate(
        [TensorSpec("m", "bool", ("b", 1))]
    )
    as_bool = [TensorSpec("m", "bool", ("b", 1))]
    with pytest.raises(DatasetError, match="'m' sample 1"):
        CalibrationDataset.from_arrays({"m": np.array([[1], [2]])}).validate(as_bool)


@pytest.mark.parametrize(
    ("model_shape", "sample_shape", "accepted"),
    [
        (("batch", 3, 16, 16), (3, 16, 16), True),
        (("batch", "c", None, 16), (5, 9, 16), True),
        ((1, 3, 16, 16), (3, 16, 16), True),
        ((), (2, 2), True),
        (("batch", 3, 16, 16), (3, 16, 15), False),
        (("batch", 3, 16, 16), (1, 3, 16, 16), False),
        (("batch", 48), (3, 16), False),
    ],
)
def test_shapes_must_fit_static_dims(
    model_shape: tuple[int | str | None, ...], sample_shape: tuple[int, ...], accepted: bool
) -> None:
    dataset = CalibrationDataset.from_arrays({"image": np.zeros((2, *sample_shape), np.float32)})
    spec = [TensorSpec("image", "float32", model_shape)]
    if accepted:
        assert len(dataset.validate(spec)) == 2
    else:
        with pytest.raises(DatasetError, match="'image'"):
            dataset.validate(spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_report_the_first_bad_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    monkeypatch.setattr(data_module, "_HASH_BATCH_BYTES", 64)  # several small streaming batches
    arrays = two_input_arrays(n=20)
    arrays["x"][13, 2] = bad
    arrays["x"][17, 0] = bad
    dataset = CalibrationDataset.open(make_npz_compressed(tmp_path, arrays))
    with pytest.raises(DatasetError, match="'x' sample 13 holds NaN or Inf") as info:
        dataset.validate(TWO_INPUT_SPECS)
    assert info.value.field == "x"


def test_overflow_when_narrowing_floats_is_reported() -> None:
    values = np.ones((3, 2), np.float32)
    values[1, 1] = 1e6
    with pytest.raises(DatasetError, match="'h' sample 1 holds values beyond float16"):
        CalibrationDataset.from_arrays({"h": values}).validate(
            [TensorSpec("h", "float16", ("n", 2))]
        )


def test_sample_counts_must_agree_and_be_positive(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="'ids': 9, 'x': 10"):
        CalibrationDataset.from_arrays(
            {"x": np.zeros((10, 4), np.float32), "ids": np.zeros((9, 3), np.int64)}
        )
    np.savez(
        tmp_path / "uneven.npz", x=np.zeros((10, 4), np.float32), ids=np.zeros((9, 3), np.int64)
    )
    with pytest.raises(DatasetError, match=r"uneven\.npz"):
        CalibrationDataset.open(tmp_path / "uneven.npz")
    empty = CalibrationDataset.from_arrays(
        {"x": np.zeros((0, 4), np.float32), "ids": np.zeros((0, 3), np.int64)}
    )
    with pytest.raises(DatasetError, match="no samples"):
        empty.validate(TWO_INPUT_SPECS)


def test_shards_must_share_inputs(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    np.savez(folder / "a.npz", **two_input_arrays(3))
    np.savez(folder / "b.npz", x=np.zeros((2, 5), np.float32), ids=np.zeros((2, 3), np.int64))
    with pytest.raises(DatasetError, match=r"'b\.npz'"):
        CalibrationDataset.open(folder)
    np.save(folder / "c.npy", np.zeros((2, 3)))
    with pytest.raises(DatasetError, match=r"either \.npz shards or \.npy"):
        CalibrationDataset.open(folder)


def test_model_input_specs_skip_initializers_and_keep_symbolic_dims() -> None:
    model = zoo.tiny_cnn()
    model.graph.input.append(
        helper.make_tensor_value_info("conv1.w", TensorProto.FLOAT, [8, 3, 3, 3])
    )
    model.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.BOOL, [None, 7]))
    specs = model_input_specs(model)
    assert specs == [
        TensorSpec("image", "float32", ("batch", 3, 16, 16)),
        TensorSpec("mask", "bool", (None, 7)),
    ]


# --- never unpickle, refuse broken files --------------------------------------------------------------


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    pickled = npy_bytes(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    path = write_zip(tmp_path / "evil.zip", {"x.npy": pickled})
    with pytest.raises(DatasetError, match="pickled or object arrays are not accepted") as info:
        CalibrationDataset.open(path)
    assert "evil.zip:x" in info.value.message
    (tmp_path / "evil.npy").write_bytes(pickled)
    with pytest.raises(DatasetError, match=r"evil\.npy: pickled"):
        CalibrationDataset.open(tmp_path / "evil.npy")
    with pytest.raises(DatasetError, match=r"'obj'.*pickled"):
        CalibrationDataset.from_arrays({"obj": np.array([[1], [None]], dtype=object)})


def test_corrupt_and_truncated_files_raise_dataset_errors(tmp_path: Path) -> None:
    arrays = {"x": np.arange(4000, dtype=np.float32).reshape(100, 40)}
    good = npz_bytes(arrays)
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip")
    npy = npy_bytes(arrays["x"])
    (tmp_path / "cut.npy").write_bytes(npy[:-7])
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    (tmp_path / "data.csv").write_text("1,2,3")
    for name in ["cut.npz", "junk.npz", "cut.npy", "junk.npy", "data.csv", "absent.npz"]:
        with pytest.raises(DatasetError, match=name.split(".")[0]):
            CalibrationDataset.open(tmp_path / name)
    # A member whose .npy header claims more rows than the member holds.
    header_lies = npy_bytes(np.zeros((10, 4), np.float32))[: -4 * 4 * 5]
    with pytest.raises(DatasetError, match="truncated or corrupt"):
        CalibrationDataset.open(write_zip(tmp_path / "lies.zip", {"x.npy": header_lies}))


def test_fortran_order_is_refused_with_a_fix(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", x=np.asfortranarray(np.zeros((4, 3), np.float32)))
    with pytest.raises(DatasetError, match="Fortran") as info:
        CalibrationDataset.open(tmp_path / "f.npz")
    assert "ascontiguousarray" in info.value.hint


# --- zip safety ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "member",
    [
        "../evil.npz",
        "/etc/evil.npz",
        "shards/../../evil.npz",
        "..\\evil.npz",
        "C:/evil.npz",
        "a/\\..\\b.npz",
    ],
)
def test_unsafe_member_paths_are_refused(tmp_path: Path, member: str) -> None:
    payload = npz_bytes(two_input_arrays(2))
    path = write_zip(tmp_path / "slip.zip", {"ok.npz": payload, member: payload})
    with zipfile.ZipFile(path) as zf:
        assert member in zf.namelist()  # the archive really carries the hostile name
    with pytest.raises(ArchiveError, match="unsafe"):
        CalibrationDataset.open(path)


def test_symlink_members_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as zf:
        info = zipfile.ZipInfo("x.npy")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symbolic link"):
        CalibrationDataset.open(path)


def test_zip_bomb_is_refused_from_the_central_directory(tmp_path: Path) -> None:
    path = write_zip(tmp_path / "bomb.zip", {"x.npy": b"tiny"}, zipfile.ZIP_DEFLATED)
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[central + 24 : central + 28] = struct.pack("<I", 0xFFFFFFF0)  # claims ~4 GiB
    path.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match="more than the allowed size"):
        CalibrationDataset.open(path)


def test_highly_compressed_members_and_many_members_are_refused(tmp_path: Path) -> None:
    zeros = np.zeros((2500, 1000), np.float64)  # 20 MB that deflates to ~20 kB
    path = write_zip(tmp_path / "bomb.zip", {"x.npy": npy_bytes(zeros)}, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 200_000
    small = ArchiveLimits(max_members=10, max_total_bytes=1 << 20, max_member_bytes=1 << 20)
    with pytest.raises(ArchiveError, match=r"bomb\.zip expands to more than the allowed size"):
        CalibrationDataset.open(path, limits=small)
    total = ArchiveLimits(max_members=10, max_total_bytes=100_000, max_member_bytes=60_000)
    members = {
        f"{i}.npy": npy_bytes(np.zeros((2, 20_000), np.uint8)) for i in range(3)
    }  # 3 x 40 kB
    with pytest.raises(ArchiveError, match="allowed size"):
        CalibrationDataset.open(write_zip(tmp_path / "wide.zip", members), limits=total)
    many = {f"{i:03d}.npy": npy_bytes(np.zeros((1, 1), np.uint8)) for i in range(11)}
    with pytest.raises(ArchiveError, match="11 members, more than the limit of 10"):
        CalibrationDataset.open(write_zip(tmp_path / "many.zip", many), limits=small)
    nested = write_zip(tmp_path / "nested.zip", {"a.npz": npz_bytes({"x": zeros}, compressed=True)})
    with pytest.raises(ArchiveError, match="allowed size"):
        CalibrationDataset.open(nested, limits=ArchiveLimits(max_member_bytes=1 << 20))


def test_lying_central_directory_size_is_caught(tmp_path: Path) -> None:
    arrays = two_input_arrays(4)
    path = write_zip(tmp_path / "lie.zip", {"x.npy": npy_bytes(arrays["x"])})
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    (size,) = struct.unpack("<I", raw[central + 24 : central + 28])
    raw[central + 20 : central + 28] = struct.pack("<II", size - 16, size - 16)
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"lie\.zip:x"):
        CalibrationDataset.open(path)


# --- laziness --------------------------------------------------------------------------------------------


def peak_traced_bytes(action: Callable[[], None]) -> int:
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def drain(dataset: CalibrationDataset, batch_size: int, total: list[float]) -> Callable[[], None]:
    def run() -> None:
        for batch in dataset.batches(batch_size):
            total.append(float(batch["x"][:, 0].sum()))

    return run


def test_stored_npz_is_read_batch_by_batch(tmp_path: Path) -> None:
    rows = np.arange(512, dtype=np.float32)[:, None] * np.ones((1, 32768), np.float32)
    np.savez(tmp_path / "big.npz", x=rows)  # 64 MB on disk, 128 kB per sample
    del rows
    dataset = CalibrationDataset.open(tmp_path / "big.npz")
    sums: list[float] = []
    peak = peak_traced_bytes(drain(dataset, 8, sums))
    assert sum(sums) == float(np.arange(512).sum())
    assert peak < 4 * 8 * 128 * 1024  # a few batches of 1 MB, not 64 MB
    digest_peak = peak_traced_bytes(lambda: dataset.digest)
    assert digest_peak < 3 * (16 << 20)


def test_compressed_npz_and_shards_stream_with_bounded_memory(tmp_path: Path) -> None:
    rows = np.repeat(np.arange(256, dtype=np.float32)[:, None], 16384, axis=1)  # 16 MB
    np.savez_compressed(tmp_path / "big.npz", x=rows)
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for i in range(8):
        np.savez_compressed(shard_dir / f"{i}.npz", x=rows[i * 32 : (i + 1) * 32])
    for path in [tmp_path / "big.npz", shard_dir]:
        dataset = CalibrationDataset.open(path)
        sums: list[float] = []
        peak = peak_traced_bytes(drain(dataset, 8, sums))
        assert sums == [float(np.arange(i, i + 8).sum()) for i in range(0, 256, 8)]
        assert peak < 4 << 20, path  # one shard (2 MB) or a few batches, not 16 MB
    backwards = CalibrationDataset.open(tmp_path / "big.npz").subset([200, 3, 201, 202, 0])
    np.testing.assert_array_equal(collect(backwards, 2)["x"][:, 7], [200, 3, 201, 202, 0])


# --- batching, subsets, splits ------------------------------------------------------------------------


def test_batches_respect_max_samples_and_refuse_bad_sizes() -> None:
    dataset = CalibrationDataset.from_arrays(two_input_arrays(10))
    assert [len(b["ids"]) for b in dataset.batches(3, max_samples=7)] == [3, 3, 1]
    assert [len(b["ids"]) for b in dataset.batches(4, max_samples=100)] == [4, 4, 2]
    batch = next(dataset.batches(2))
    batch["x"][:] = 0  # callers may scribble on batches without changing the dataset
    assert next(dataset.batches(2))["x"].any()
    with pytest.raises(DatasetError, match="Batch size"):
        dataset.batches(0)
    with pytest.raises(DatasetError, match="max_samples"):
        dataset.batches(1, max_samples=0)


def test_split_is_deterministic_disjoint_and_sorted(tmp_path: Path) -> None:
    arrays = two_input_arrays(50)
    dataset = CalibrationDataset.open(make_shard_zip(tmp_path, two_input_arrays(10)))
    calib, evaluation = dataset.split(0.3, seed=7)
    assert len(calib) == 7 and len(evaluation) == 3
    memory = CalibrationDataset.from_arrays(arrays)
    cal, ev = memory.split(0.2, seed=1)
    cal_x, ev_x = collect(cal)["x"], collect(ev)["x"]
    cal_idx = [int(np.flatnonzero((arrays["x"] == row).all(axis=1))[0]) for row in cal_x]
    ev_idx = [int(np.flatnonzero((arrays["x"] == row).all(axis=1))[0]) for row in ev_x]
    assert len(ev_idx) == 10 and sorted(cal_idx + ev_idx) == list(range(50))
    assert cal_idx == sorted(cal_idx) and ev_idx == sorted(ev_idx)
    perm = np.random.default_rng(1).permutation(50)
    assert ev_idx == sorted(perm[:10].tolist())
    again = memory.split(0.2, seed=1)
    assert again[1].digest == ev.digest and again[0].digest == cal.digest
    assert memory.split(0.2, seed=2)[1].digest != ev.digest
    assert [len(part) for part in memory.split(0.001)] == [49, 1]
    assert [len(part) for part in memory.split(0.0)] == [50, 0]
    single = CalibrationDataset.from_arrays({k: v[:1] for k, v in arrays.items()})
    assert [len(part) for part in single.split(0.5)] == [1, 0]
    with pytest.raises(DatasetError, match="eval_fraction"):
        memory.split(1.0)


def test_subset_keeps_the_given_order_and_checks_bounds(tmp_path: Path) -> None:
    arrays = two_input_arrays(10)
    dataset = CalibrationDataset.open(make_shard_dir(tmp_path, arrays))
    picked = dataset.subset([9, 0, 4, 5, 6])
    np.testing.assert_array_equal(collect(picked, 2)["ids"], arrays["ids"][[9, 0, 4, 5, 6]])
    nested = picked.subset([1, 2])
    np.testing.assert_array_equal(collect(nested)["x"], arrays["x"][[0, 4]])
    with pytest.raises(DatasetError, match=r"\[0, 5\)"):
        picked.subset([5])
