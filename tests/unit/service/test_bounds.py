"""Request sizes bounded by settings (422 limit_exceeded naming field and setting), and the build
child's memory limit and its classification of allocation failures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import LimitExceededError
from service.schemas import BuildCreate
from service.settings import Settings
from service.store.bounds import check_request_bounds, request_bounds
from service.worker.limits import allocation_failed, memory_limit_bytes


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def _request(**body: object) -> BuildCreate:
    return BuildCreate.model_validate({"model_id": "m", "dataset_id": "d", **body})


@pytest.mark.parametrize(
    ("body", "field", "setting"),
    [
        ({"benchmark": {"batch_size": 257}}, "benchmark.batch_size", "MAX_BENCHMARK_BATCH_SIZE"),
        ({"benchmark": {"duration_s": 600}}, "benchmark.duration_s", "MAX_BENCHMARK_DURATION_S"),
        ({"benchmark": {"iterations": 501}}, "benchmark.iterations", "MAX_BENCHMARK_ITERATIONS"),
        ({"benchmark": {"warmup_ms": 9000.5}}, "benchmark.warmup_ms", "MAX_BENCHMARK_WARMUP_MS"),
        ({"calibration": {"batch_size": 65}}, "calibration.batch_size", "MAX_CALIBRATION_BATCH_SIZE"),
        ({"calibration": {"max_samples": 101}}, "calibration.max_samples", "MAX_CALIBRATION_SAMPLES"),
        ({"accuracy": {"max_samples": 101}}, "accuracy.max_samples", "MAX_ACCURACY_SAMPLES"),
    ],
)
def test_a_size_over_its_setting_is_refused_naming_field_and_setting(
    tmp_path: Path, body: dict[str, object], field: str, setting: str
) -> None:
    settings = _settings(
        tmp_path,
        max_benchmark_iterations=500,
        max_benchmark_duration_s=60,
        max_benchmark_warmup_ms=9000,
        max_calibration_batch_size=64,
        max_calibration_samples=100,
        max_accuracy_samples=100,
    )
    with pytest.raises(LimitExceededError) as info:
        check_request_bounds(_request(**body), settings)
    assert info.value.field == field
    assert f"TRTFORGE_{setting}" in info.value.hint
    assert info.value.code == "limit_exceeded"


def test_sizes_at_their_bounds_and_unset_sizes_pass(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    check_request_bounds(_request(), settings)
    at_bounds = {
        field.split(".")[0]: {} for field, *_ in request_bounds(_request(), settings)
    }
    for field, _value, _setting, bound in request_bounds(_request(), settings):
        group, name = field.split(".")
        at_bounds[group][name] = bound
    check_request_bounds(_request(**at_bounds), settings)


def test_every_size_of_the_request_is_bounded(tmp_path: Path) -> None:
    fields = {field for field, *_ in request_bounds(_request(), _settings(tmp_path))}
    sizes = {
        f"{group}.{name}"
        for group in ("benchmark", "calibration", "accuracy")
        for name in type(getattr(_request(), group)).model_fields
        if name in ("batch_size", "iterations", "duration_s", "warmup_ms", "max_samples")
    }
    assert fields == sizes


def test_the_memory_limit_defaults_to_three_quarters_of_memory(tmp_path: Path) -> None:
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_limit_bytes(_settings(tmp_path)) == total * 3 // 4
    assert memory_limit_bytes(_settings(tmp_path, build_memory_bytes=0)) is None
    assert memory_limit_bytes(_settings(tmp_path, build_memory_bytes=1 << 30)) == 1 << 30


def test_under_the_limit_an_allocation_fails_inside_the_process() -> None:
    script = (
        "from service.worker.runner import limit_memory; limit_memory(512 << 20);"
        "import numpy as np\n"
        "try:\n    np.ones((1 << 30,), np.float32)\nexcept MemoryError as e:\n    print('MemoryError', e)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("MemoryError")


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("The build crashed: MemoryError: Unable to allocate 1.49 GiB", True),
        ("[ONNXRuntimeError] : 1 : FAIL : ... Failed to allocate memory for requested buffer", True),
        ("std::bad_alloc", True),
        ("Keep pattern 'x' matches no node of the model.", False),
        ("CUDA error: an illegal memory access was encountered", False),
    ],
)
def test_allocation_failures_are_told_from_other_failures(message: str, expected: bool) -> None:
    assert allocation_failed(message) is expected
