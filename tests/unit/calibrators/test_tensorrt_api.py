"""calibrators/tensorrt.py on a machine without TensorRT: its API surface against the real
bindings, its lazy imports, and the calibrator logic that does not need a GPU."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from calibrators import tensorrt as native
from calibrators.errors import CalibrationError, DatasetError, TableError
from calibrators.spec import CalibrationMethod
from calibrators.table import CalibrationTable, TensorRTAlgorithm
from core import cuda
from core import tensorrt as trt_door
from core.errors import CudaError, TensorRTUnavailableError
from tests import trt_surface

ROOT = Path(__file__).resolve().parents[3]
MODULE = "calibrators/tensorrt.py"
FIXTURES = next(
    (
        d
        for d in (
            ROOT / "tests" / "fixtures" / "tensorrt-caches",
            ROOT.parent / "shared" / "fixtures" / "tensorrt-caches",
        )
        if d.is_dir()
    ),
    ROOT / "tests" / "fixtures" / "tensorrt-caches",
)


@pytest.fixture(scope="module")
def uses() -> list[trt_surface.Use]:
    found, unknown = trt_surface.collect_uses((ROOT / MODULE).read_text(), MODULE)
    assert not unknown
    return found


# -- the API surface --------------------------------------------------------------------------


def test_collector_sees_the_native_calibrator_bases_and_overrides(
    uses: list[trt_surface.Use],
) -> None:
    modules = {u.names for u in uses if u.kind == "module"}
    assert {("IInt8EntropyCalibrator2",), ("IInt8MinMaxCalibrator",)} <= modules
    overrides = {u.names[0] for u in uses if u.kind == "override"}
    assert overrides == {
        "get_batch_size",
        "get_batch",
        "read_calibration_cache",
        "write_calibration_cache",
    }
    assert all(u.implicit_only for u in uses if u.kind == "override")


def test_every_tensorrt_name_exists_in_the_tensorrt10_bindings(
    uses: list[trt_surface.Use],
) -> None:
    bindings = trt_surface.require_bindings(10)
    assert bindings.has("IInt8EntropyCalibrator2")  # the extractor reads this file for real
    assert not bindings.has("IInt8EntropyCalibrator3")
    assert trt_surface.missing_in_bindings(uses, bindings, skip_implicit=False) == []


def test_overrides_and_bases_belong_to_the_calibrator_classes_in_the_stubs(
    uses: list[trt_surface.Use],
) -> None:
    stubs = trt_surface.require_stubs()
    assert trt_surface.missing_in_stubs(uses, stubs) == []
    assert stubs.has_member("IInt8EntropyCalibrator2", "get_batch")  # inherited or declared


def test_tensorrt11_has_no_native_calibrators(uses: list[trt_surface.Use]) -> None:
    """Why native_calibrator refuses TensorRT 11: its base classes are gone from the bindings."""
    bindings = trt_surface.require_bindings(11)
    missing = trt_surface.missing_in_bindings(uses, bindings, skip_implicit=False)
    assert any("IInt8EntropyCalibrator2" in m for m in missing)
    assert trt_surface.missing_in_bindings(uses, bindings, skip_implicit=True) == []


# -- lazy imports ----------------------------------------------------------------------------


def _without(monkeypatch: pytest.MonkeyPatch, *missing: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        return None if name.split(".")[0] in missing else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_stub_namespace_package_is_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs installs tensorrt/__init__.pyi: Python finds a namespace package, no origin
    namespace = importlib.machinery.ModuleSpec("tensorrt", None, is_package=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: namespace)
    assert trt_door.tensorrt_installed() is False
    with pytest.raises(TensorRTUnavailableError):
        trt_door.require_tensorrt()


def test_missing_tensorrt_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "tensorrt")
    assert trt_door.tensorrt_installed() is False
    with pytest.raises(TensorRTUnavailableError) as info:
        native.native_calibrator(None, table=CalibrationTable(amax={"x": 1.0}))
    assert "pypi.nvidia.com" in info.value.hint
    assert info.value.code == "tensorrt_unavailable"


def test_missing_cuda_python_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "cuda")
    with pytest.raises(TensorRTUnavailableError) as info:
        cuda.import_cudart()
    assert "trtforge[gpu]" in info.value.hint


def test_cuda_call_unpacks_results_and_names_the_failing_call() -> None:
    assert cuda.cuda_call((0,), "cudaFree") is None
    assert cuda.cuda_call((0, 1234), "cudaMalloc") == 1234
    assert cuda.cuda_call((0, 5, 80), "cudaMemGetInfo") == (5, 80)
    with pytest.raises(CudaError, match=r"cudaMalloc\(64\) failed: 2 \(2\)"):
        cuda.cuda_call((2, None), "cudaMalloc(64)")


# -- the calibrator's logic (no GPU needed) ----------------------------------------------------


class HostFeeder:
    """Stands in for device memory: hands out one fake address per input, records the batches."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.addresses = {name: 0x1000 * (i + 1) for i, name in enumerate(names)}
        self.copied: list[dict[str, np.ndarray]] = []
        self.closed = False

    def copy(self, batch: Mapping[str, np.ndarray]) -> dict[str, int]:
        self.copied.append(dict(batch))
        return dict(self.addresses)

    def close(self) -> None:
        self.closed = True


def _batches(count: int, batch: int, last: int) -> list[dict[str, np.ndarray]]:
    sizes = [batch] * count + ([last] if last else [])
    return [
        {"a": np.full((n, 2), i, np.float32), "b": np.full((n, 3), -i, np.float32)}
        for i, n in enumerate(sizes)
    ]


def test_get_batch_returns_pointers_in_the_order_tensorrt_asks_and_drops_a_short_batch() -> None:
    feeder = HostFeeder(("a", "b"))
    core = native.CalibratorCore(
        algorithm=TensorRTAlgorithm.ENTROPY2,
        batch_size=4,
        trt_version=101303,
        batches=iter(_batches(2, 4, last=3)),
        feeder=feeder,
    )
    assert core.get_batch_size() == 4
    assert core.get_batch(["b", "a"]) == [0x2000, 0x1000]
    assert core.get_batch(["a", "b"]) == [0x1000, 0x2000]
    assert core.get_batch(["a", "b"]) is None  # 3 < 4 samples: TensorRT needs full batches
    assert core.samples_fed == 8
    assert [int(c["a"][0, 0]) for c in feeder.copied] == [0, 1]
    core.close()
    assert feeder.closed
    assert core.get_batch(["a", "b"]) is None
    core.raise_error()  # nothing went wrong


def test_get_batch_keeps_errors_for_after_the_build() -> None:
    core = native.CalibratorCore(
        algorithm=TensorRTAlgorithm.MINMAX,
        batch_size=2,
        trt_version=101303,
        batches=iter(_batches(3, 2, last=0)),
        feeder=HostFeeder(("a", "b")),
    )
    assert core.get_batch(["a", "images"]) is None  # must not raise into TensorRT
    assert core.get_batch(["a", "b"]) is None  # calibration stays ended
    with pytest.raises(DatasetError, match="'images'"):
        core.raise_error()


def test_no_dataset_means_no_batches() -> None:
    core = native.CalibratorCore(algorithm="EntropyCalibration2", batch_size=8, trt_version=8601)
    assert core.get_batch(["x"]) is None
    assert core.read_calibration_cache() is None


def test_served_table_is_rewritten_for_the_reading_calibrator_and_tensorrt() -> None:
    table = CalibrationTable(amax={"x": 1.0, "(Unnamed Layer* 4) [Shuffle]_output": 0.0})
    assert table.algorithm is TensorRTAlgorithm.ENTROPY2
    core = native.CalibratorCore(
        algorithm=TensorRTAlgorithm.MINMAX, batch_size=1, trt_version=100800, served=table
    )
    cache = core.read_calibration_cache()
    assert cache == (
        b"TRT-100800-MinMaxCalibration\nx: 3c010204\n(Unnamed Layer* 4) [Shuffle]_output: 0\n"
    )


def test_table_written_by_tensorrt_is_kept_with_provenance() -> None:
    original = (FIXTURES / "trt8510-mnist-cnn-a.cache").read_bytes()
    received: list[CalibrationTable] = []
    core = native.CalibratorCore(
        algorithm=TensorRTAlgorithm.ENTROPY2,
        batch_size=4,
        trt_version=8510,
        batches=iter(_batches(2, 4, last=0)),
        feeder=HostFeeder(("a", "b")),
        on_table=received.append,
        dataset_digest=lambda: "d" * 64,
    )
    core.get_batch(["a", "b"])
    core.get_batch(["a", "b"])
    core.write_calibration_cache(memoryview(original))  # what pybind11 hands over
    assert core.table is not None and received == [core.table]
    table = core.table
    assert table.method is CalibrationMethod.ENTROPY
    assert table.samples == 8
    assert table.dataset_sha256 == "d" * 64
    assert table.parameters == {"calibrator": "tensorrt EntropyCalibration2"}
    assert table.to_cache_text().encode() == original  # and TensorRT gets it back unchanged
    core.raise_error()


def test_a_bad_cache_from_tensorrt_is_kept_as_an_error() -> None:
    core = native.CalibratorCore(
        algorithm=TensorRTAlgorithm.ENTROPY2, batch_size=1, trt_version=8601
    )
    core.write_calibration_cache(b"not a cache")
    assert core.table is None
    with pytest.raises(TableError, match="Line 1"):
        core.raise_error()


def test_table_path_is_read_when_present_and_written_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "calib.cache"
    served, on_table = native._table_io(path, None)
    assert served is None and on_table is not None
    computed = CalibrationTable.from_cache_text("TRT-8601-EntropyCalibration2\nx: 3c010204\n")
    on_table(computed)
    assert path.read_text() == "TRT-8601-EntropyCalibration2\nx: 3c010204\n"
    served, _ = native._table_io(path, None)
    assert served == computed


def test_factory_refuses_a_calibrator_with_neither_data_nor_table() -> None:
    with pytest.raises(CalibrationError, match="needs a dataset"):
        native._core(None, TensorRTAlgorithm.ENTROPY2, 8, None, None, None, 101303, 0)
    with pytest.raises(CalibrationError, match="batch_size"):
        native._core(None, TensorRTAlgorithm.ENTROPY2, 0, None, None, None, 101303, 0)
