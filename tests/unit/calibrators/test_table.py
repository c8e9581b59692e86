from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from calibrators.errors import TableError
from calibrators.spec import CalibrationMethod
from calibrators.table import (
    DEFAULT_TRT_VERSION,
    CalibrationTable,
    RangeChoice,
    RangeCriterion,
    TensorRTAlgorithm,
    algorithm_for_method,
    is_tensorrt_internal_name,
    trt_version_number,
    trt_version_string,
)

ROOT = Path(__file__).resolve().parents[3]
_FIXTURE_DIRS = (
    ROOT / "tests" / "fixtures" / "tensorrt-caches",
    ROOT.parent / "shared" / "fixtures" / "tensorrt-caches",
)
FIXTURES = next((d for d in _FIXTURE_DIRS if d.is_dir()), _FIXTURE_DIRS[0])
CACHE_FILES = {
    "trt7202-mnist-caffe.cache": (7202, 9),
    "trt8401-segformer-excerpt.cache": (8401, 16),
    "trt8510-mnist-cnn-a.cache": (8510, 22),
    "trt8510-mnist-cnn-b.cache": (8510, 20),
}


def test_the_real_tensorrt_caches_are_present() -> None:
    # A missing fixture folder must fail, never silently shrink the round-trip tests below.
    assert FIXTURES.is_dir(), f"TensorRT cache fixtures not found in any of {_FIXTURE_DIRS}"
    assert sorted(p.name for p in FIXTURES.glob("*.cache")) == sorted(CACHE_FILES)


@pytest.mark.parametrize("name", sorted(CACHE_FILES))
def test_real_caches_parse(name: str) -> None:
    version, count = CACHE_FILES[name]
    table = CalibrationTable.load(FIXTURES / name)
    assert table.trt_version == version
    assert table.algorithm is TensorRTAlgorithm.ENTROPY2
    assert len(table.amax) == count
    assert all(v >= 0 for v in table.amax.values())


@pytest.mark.parametrize("name", sorted(CACHE_FILES))
def test_real_caches_round_trip_byte_identically(name: str, tmp_path: Path) -> None:
    original = (FIXTURES / name).read_bytes()
    table = CalibrationTable.from_cache_text(original.decode())
    assert table.to_cache_text().encode() == original
    out = table.save(tmp_path / name)
    assert out.read_bytes() == original
    # and through the JSON twin
    again = CalibrationTable.from_json(table.to_json())
    assert again == table
    assert again.to_cache_text().encode() == original


def test_known_values_from_a_real_cache() -> None:
    table = CalibrationTable.load(FIXTURES / "trt8510-mnist-cnn-a.cache")
    # x: 4000890a -> scale 2.00836..., pixels in 0..255
    assert table.scale("x") == pytest.approx(2.008363, rel=1e-6)
    assert table.amax["x"] == pytest.approx(255.062, rel=1e-5)
    assert list(table.amax)[:2] == ["x", "/conv1/Conv_output_0"]
    assert "(Unnamed Layer* 9) [Matrix Multiply]_output" in table.amax


def test_zero_scales_read_and_write_as_0() -> None:
    table = CalibrationTable.load(FIXTURES / "trt8401-segformer-excerpt.cache")
    assert table.amax["366"] == 0.0
    assert table.amax["(Unnamed Layer* 64) [Shuffle]_output"] == 0.0
    text = CalibrationTable(amax={"t": 0.0}).to_cache_text(8601)
    assert text == "TRT-8601-EntropyCalibration2\nt: 0\n"


@pytest.mark.parametrize(
    ("amax", "hex_text"),
    [(1.0, "3c010204"), (2048.5 / 2048, "3c010a14"), (127.0, "3f800000"), (0.0, "0")],
)
def test_scale_hex_is_the_float32_bits_of_amax_over_127(amax: float, hex_text: str) -> None:
    text = CalibrationTable(amax={"t": amax}).to_cache_text(101303)
    assert text.splitlines()[1] == f"t: {hex_text}"
    expected = struct.unpack(">f", bytes.fromhex(hex_text.rjust(8, "0")))[0]
    assert CalibrationTable(amax={"t": amax}).scale("t") == expected
    assert expected == np.float32(amax / 127)


def test_small_scales_have_no_leading_zeros() -> None:
    bits = 0x00012345  # a subnormal float32 scale
    amax = struct.unpack(">f", bits.to_bytes(4, "big"))[0] * 127
    line = CalibrationTable(amax={"t": amax}).to_cache_text(8601).splitlines()[1]
    assert line == "t: 12345"
    assert (
        CalibrationTable.from_cache_text("TRT-8601-MinMaxCalibration\nt: 12345\n").amax["t"] == amax
    )


@pytest.mark.parametrize(
    "name",
    [
        "(Unnamed Layer* 4) [Fully Connected]_output",
        "model/dense/Einsum:0",
        "odd: name: with colons",
        "trailing colon:",
        " spaced  name ",
        "/encoder/layer.0/attention/Softmax_output_0",
    ],
)
def test_names_with_spaces_brackets_slashes_and_colons_round_trip(name: str) -> None:
    table = CalibrationTable(amax={name: 3.5, "plain": 1.0})
    text = table.to_cache_text(8601)
    back = CalibrationTable.from_cache_text(text)
    assert list(back.amax) == [name, "plain"]
    assert back.scale(name) == table.scale(name)
    assert back.to_cache_text() == text


def test_amax_is_stored_so_that_the_float32_scale_is_exact() -> None:
    back = CalibrationTable.from_cache_text("TRT-8601-EntropyCalibration2\nt: 3f9db09c\n")
    scale = struct.unpack(">f", bytes.fromhex("3f9db09c"))[0]
    assert back.amax["t"] == scale * 127  # float64, exact
    assert back.scale("t") == scale


def test_writing_keeps_the_read_version_unless_told_otherwise() -> None:
    table = CalibrationTable.from_cache_text("TRT-8601-MinMaxCalibration\na: 3c010204\n")
    assert table.to_cache_text().startswith("TRT-8601-MinMaxCalibration\n")
    assert table.to_cache_text(101303).startswith("TRT-101303-MinMaxCalibration\n")
    fresh = CalibrationTable(amax={"a": 1.0}, method=CalibrationMethod.ENTROPY)
    assert fresh.to_cache_text().startswith(f"TRT-{DEFAULT_TRT_VERSION}-EntropyCalibration2\n")


def test_cache_without_final_newline_or_with_crlf_is_read() -> None:
    table = CalibrationTable.from_cache_text("TRT-8601-EntropyCalibration2\r\na: 3c010204\r\nb: 0")
    assert table.amax == {"a": pytest.approx(1.0), "b": 0.0}
    assert table.to_cache_text() == "TRT-8601-EntropyCalibration2\na: 3c010204\nb: 0\n"


def test_header_only_cache_is_an_empty_table() -> None:
    table = CalibrationTable.from_cache_text("TRT-101303-EntropyCalibration2\n")
    assert table.amax == {}
    assert table.to_cache_text() == "TRT-101303-EntropyCalibration2\n"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", None, "empty"),
        ("TRT-8601\na: 1\n", 1, "header"),
        ("TensorRT cache\na: 1\n", 1, "header"),
        ("TRT-8601-KLCalibration\na: 1\n", 1, "unknown calibration algorithm"),
        ("TRT-8601-EntropyCalibration2\na: 3c010204\nb 3c010204\n", 3, "<tensor name>"),
        ("TRT-8601-EntropyCalibration2\na: 3c010204\nb: 3g010204\n", 3, "not a float32 bit"),
        ("TRT-8601-EntropyCalibration2\na: 3c0102041\n", 2, "not a float32 bit"),
        ("TRT-8601-EntropyCalibration2\na: 7f800000\n", 2, "not finite"),
        ("TRT-8601-EntropyCalibration2\na: bf800000\n", 2, "negative"),
        ("TRT-8601-EntropyCalibration2\n: 3c010204\n", 2, "<tensor name>"),
        ("TRT-8601-EntropyCalibration2\na: 1\nb: 2\na: 3\n", 4, "already has a scale on line 2"),
    ],
)
def test_bad_caches_raise_table_error_with_the_line(
    text: str, line: int | None, fragment: str
) -> None:
    with pytest.raises(TableError) as info:
        CalibrationTable.from_cache_text(text)
    message = info.value.message
    if line is not None:
        assert message.startswith(f"Line {line}:"), message
    assert fragment in message
    assert info.value.hint


def test_unknown_algorithm_hint_lists_the_known_ones() -> None:
    with pytest.raises(TableError) as info:
        CalibrationTable.from_cache_text("TRT-8601-Foo\n")
    assert "MinMaxCalibration" in info.value.hint


@pytest.mark.parametrize(
    ("version", "number"),
    [
        ("7.2.2", 7202),
        ("8.4.1", 8401),
        ("8.5.10", 8510),
        ("8.6.1", 8601),
        ("8.6.1.6", 8601),
        ("9.3.0", 9300),
        ("10.0.0b6", 100000),
        ("10.13.3", 101303),
        ("10.16.1.11", 101601),
        ("11.4.0", 110400),
        ("10.1", 100100),
    ],
)
def test_trt_version_numbers(version: str, number: int) -> None:
    assert trt_version_number(version) == number
    assert trt_version_number(trt_version_string(number)) == number


@pytest.mark.parametrize("bad", ["", "ten", "8.12.0", "10.100.0", "8.6.100", "0.1.0"])
def test_bad_trt_versions(bad: str) -> None:
    with pytest.raises(TableError) as info:
        trt_version_number(bad)
    assert info.value.field == "trt_version"


def test_trt_version_strings() -> None:
    assert trt_version_string(8510) == "8.5.10"
    assert trt_version_string(101303) == "10.13.3"
    assert trt_version_string(7202) == "7.2.2"


def test_methods_map_to_the_calibrator_that_will_read_the_table() -> None:
    assert algorithm_for_method(CalibrationMethod.ENTROPY) is TensorRTAlgorithm.ENTROPY2
    assert algorithm_for_method(CalibrationMethod.MINMAX) is TensorRTAlgorithm.MINMAX
    # no TensorRT counterpart: served through IInt8EntropyCalibrator2 (what trtexec --calib uses)
    assert algorithm_for_method(CalibrationMethod.PERCENTILE) is TensorRTAlgorithm.ENTROPY2
    assert algorithm_for_method("mse") is TensorRTAlgorithm.ENTROPY2
    assert algorithm_for_method(CalibrationMethod.AUTO) is TensorRTAlgorithm.ENTROPY2
    assert algorithm_for_method("mse", calibrator="MinMaxCalibration") is TensorRTAlgorithm.MINMAX
    assert algorithm_for_method(None) is TensorRTAlgorithm.ENTROPY2
    table = CalibrationTable(amax={"a": 1.0}, method=CalibrationMethod.MINMAX)
    assert table.algorithm is TensorRTAlgorithm.MINMAX
    assert table.to_cache_text(8601).startswith("TRT-8601-MinMaxCalibration\n")
    retargeted = table.with_algorithm(TensorRTAlgorithm.ENTROPY2, trt_version=101303)
    assert retargeted.to_cache_text().startswith("TRT-101303-EntropyCalibration2\n")
    assert retargeted.amax == table.amax


def test_json_twin_keeps_all_metadata(tmp_path: Path) -> None:
    table = CalibrationTable(
        amax={"z": 2.5, "a": 0.125, "model/dense/Einsum:0": 7.0},
        method=CalibrationMethod.PERCENTILE,
        parameters={"percentile": 99.99, "num_bins": 2048, "histogram": "exact"},
        samples=512,
        model_sha256="ab" * 32,
        dataset_sha256="cd" * 32,
    )
    path = table.save(tmp_path / "table.json")
    payload = json.loads(path.read_text())
    assert payload["format"] == "trtforge-calibration-table/1"
    assert payload["method"] == "percentile"
    assert payload["algorithm"] == "EntropyCalibration2"
    back = CalibrationTable.load(path)
    assert back == table
    assert list(back.amax) == ["z", "a", "model/dense/Einsum:0"]
    assert isinstance(back.parameters["num_bins"], int)
    assert back.digest == table.digest


def test_json_errors_are_table_errors() -> None:
    with pytest.raises(TableError, match="Line 1"):
        CalibrationTable.from_json("{not json")
    with pytest.raises(TableError, match="not a trtforge calibration table"):
        CalibrationTable.from_json('{"amax": {}}')
    bad = json.dumps({"format": "trtforge-calibration-table/1", "amax": {"a": -1.0}})
    with pytest.raises(TableError, match="amax"):
        CalibrationTable.from_json(bad)


def test_invalid_ranges_are_refused() -> None:
    for amax in (float("nan"), float("inf"), -1.0, -0.0, 1e50):
        with pytest.raises(ValueError, match=r"amax|overflows"):
            CalibrationTable(amax={"t": amax})
    with pytest.raises(ValueError, match="cannot be written"):
        CalibrationTable(amax={"a\nb": 1.0})


def test_digest_changes_with_content_and_order() -> None:
    a = CalibrationTable(amax={"x": 1.0, "y": 2.0})
    assert a.digest == CalibrationTable(amax={"x": 1.0, "y": 2.0}).digest
    assert a.digest != CalibrationTable(amax={"x": 1.0, "y": 2.5}).digest
    assert a.digest != CalibrationTable(amax={"y": 2.0, "x": 1.0}).digest
    assert a.digest != a.with_algorithm(TensorRTAlgorithm.MINMAX).digest
    assert len(a.digest) == 64


def test_scale_of_an_unknown_tensor() -> None:
    with pytest.raises(TableError, match="'nope' has no range"):
        CalibrationTable(amax={"x": 1.0}).scale("nope")


def test_compare_with_model_reports_unknown_and_missing() -> None:
    table = CalibrationTable.load(FIXTURES / "trt8510-mnist-cnn-a.cache")
    model_tensors = [
        "x",
        "/conv1/Conv_output_0",
        "/relu1/Relu_output_0",
        "/bn1/BatchNormalization_output_0",
        "/mp1/MaxPool_output_0",
        "/new/Conv_output_0",
    ]
    match = table.compare_with_model(model_tensors)
    assert match.missing_tensors == ("/new/Conv_output_0",)
    assert match.matched_tensors == 5
    assert "/conv2/Conv_output_0" in match.unknown_tensors
    assert "y" in match.unknown_tensors
    assert "(Unnamed Layer* 9) [Matrix Multiply]_output" in match.tensorrt_internal_tensors
    assert not any(is_tensorrt_internal_name(n) for n in match.unknown_tensors)
    assert not match.complete
    assert CalibrationTable(amax={"a": 1.0}).compare_with_model({"a"}).complete


def test_internal_names() -> None:
    assert is_tensorrt_internal_name("(Unnamed Layer* 28) [TopK]_output_1")
    assert is_tensorrt_internal_name("(Unnamed Layer* 4) [Fully Connected]_output")
    assert not is_tensorrt_internal_name("/fc1/Gemm_output_0")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="Cannot read"):
        CalibrationTable.load(tmp_path / "missing.cache")
    binary = tmp_path / "engine.cache"
    binary.write_bytes(b"TRT-8601-EntropyCalibration2\nok: 0\n\xff\xfe\x00")
    with pytest.raises(TableError, match="line 3: not UTF-8"):
        CalibrationTable.load(binary)


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    table = CalibrationTable(amax={"a": 1.0})
    target = tmp_path / "sub" / "t.cache"
    table.save(target, trt_version=8601)
    table.save(target, trt_version=101303)
    assert target.read_text() == "TRT-101303-EntropyCalibration2\na: 3c010204\n"
    assert [p.name for p in target.parent.iterdir()] == ["t.cache"]


def _auto_table() -> CalibrationTable:
    choice = RangeChoice(
        method="minmax",
        criterion=RangeCriterion.CONSUMER_OUTPUT,
        candidates={"entropy": 0.045, "minmax": 0.415},
        errors={"entropy": 0.9, "minmax": 0.01},
        consumers=("conv_1",),
    )
    return CalibrationTable(
        amax={"x": 0.415, "y": 6.0},
        method=CalibrationMethod.AUTO,
        parameters={"num_quant_bins": 128, "samples": 16},
        samples=64,
        range_choices={"x": choice},
    )


def test_auto_choices_round_trip_in_the_json_twin_and_stay_out_of_the_cache(
    tmp_path: Path,
) -> None:
    table = _auto_table()
    back = CalibrationTable.load(table.save(tmp_path / "auto.json"))
    assert back == table
    assert back.range_choices is not None
    assert back.range_choices["x"].criterion is RangeCriterion.CONSUMER_OUTPUT
    assert back.range_choices["x"].consumers == ("conv_1",)
    plain = table.model_copy(update={"range_choices": None})
    assert table.to_cache_text(101303) == plain.to_cache_text(101303)
    assert table.to_cache_text(101303).splitlines()[0] == "TRT-101303-EntropyCalibration2"
    assert table.digest != plain.digest


def test_tables_without_choices_keep_their_json_and_digest() -> None:
    table = CalibrationTable(
        amax={"x": 1.0, "y": 2.0},
        method=CalibrationMethod.ENTROPY,
        parameters={"num_quant_bins": 128},
        samples=8,
    )
    assert "range_choices" not in json.loads(table.to_json())
    # the digest this table had before choices existed (computed with the previous table.py)
    assert table.digest == "3f1698a334698bb4bb6da52704d1ebfa135ffdd5dfaf27455989711a4ba96ffb"


def test_range_choice_errors_must_be_finite() -> None:
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="finite"):
            RangeChoice(method="mse", criterion=RangeCriterion.TENSOR, errors={"mse": bad})
