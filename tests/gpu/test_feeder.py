"""DeviceBatchFeeder on a real GPU (no TensorRT needed)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from calibrators.errors import CalibrationError, DatasetError
from calibrators.tensorrt import DeviceBatchFeeder
from core.cuda import cuda_call
from core.tensors import TensorSpec

pytestmark = pytest.mark.gpu

SPECS = (
    TensorSpec("image", "float32", (3, 8, 8)),
    TensorSpec("input_ids", "int64", (5,)),
    TensorSpec("mask", "bool", (5,)),
)


def _read_back(cudart: Any, pointer: int, like: np.ndarray) -> np.ndarray:
    out = np.empty_like(like)
    kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    cuda_call(cudart.cudaMemcpy(out.ctypes.data, pointer, out.nbytes, kind), "cudaMemcpy D2H")
    return out


def _batch(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "image": rng.normal(size=(n, 3, 8, 8)).astype(np.float32),
        "input_ids": rng.integers(0, 30000, size=(n, 5)),
        "mask": rng.random((n, 5)) > 0.5,
    }


def _free_bytes(cudart: Any) -> int:
    free, _total = cuda_call(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free)


def test_batches_reach_the_device_intact(cudart: Any) -> None:
    rng = np.random.default_rng(0)
    with DeviceBatchFeeder(SPECS, max_batch=4) as feeder:
        pointers = feeder.pointers
        assert set(pointers) == {"image", "input_ids", "mask"}
        assert len(set(pointers.values())) == 3 and all(p > 0 for p in pointers.values())
        for n in (4, 2):  # a full batch, then a short last one
            batch = _batch(rng, n)
            assert feeder.copy(batch) == pointers  # same buffers every batch
            for name, array in batch.items():
                np.testing.assert_array_equal(_read_back(cudart, pointers[name], array), array)


def test_non_contiguous_arrays_are_copied_as_their_values(cudart: Any) -> None:
    spec = TensorSpec("x", "float32", (4,))
    base = np.arange(32, dtype=np.float32).reshape(4, 8)
    view = base[:, ::2]  # strided: the feeder must not copy the raw buffer
    with DeviceBatchFeeder([spec], max_batch=4) as feeder:
        pointer = feeder.copy({"x": view})["x"]
        np.testing.assert_array_equal(_read_back(cudart, pointer, np.ascontiguousarray(view)), view)


def test_closing_frees_the_device_memory(cudart: Any) -> None:
    cuda_call(cudart.cudaFree(0), "cudaFree(0)")  # create the context before measuring
    size = 256 * 2**20
    spec = TensorSpec("x", "float32", (size // 4 // 8,))
    before = _free_bytes(cudart)
    feeder = DeviceBatchFeeder([spec], max_batch=8)
    during = _free_bytes(cudart)
    assert before - during >= size * 0.9
    feeder.close()
    after = _free_bytes(cudart)
    assert abs(before - after) < 32 * 2**20
    feeder.close()  # idempotent
    with pytest.raises(CalibrationError, match="closed"):
        feeder.copy({"x": np.zeros((1, size // 32), np.float32)})


def test_wrong_batches_are_refused_before_copying(cudart: Any) -> None:
    rng = np.random.default_rng(1)
    with DeviceBatchFeeder(SPECS, max_batch=2) as feeder:
        with pytest.raises(DatasetError, match="exceeds"):
            feeder.copy(_batch(rng, 3))
        wrong_dtype = _batch(rng, 2) | {"image": np.zeros((2, 3, 8, 8), np.float64)}
        with pytest.raises(DatasetError, match="float64"):
            feeder.copy(wrong_dtype)
        wrong_shape = _batch(rng, 2) | {"input_ids": np.zeros((2, 6), np.int64)}
        with pytest.raises(DatasetError, match="input_ids"):
            feeder.copy(wrong_shape)
        missing = {k: v for k, v in _batch(rng, 2).items() if k != "mask"}
        with pytest.raises(DatasetError, match="mask"):
            feeder.copy(missing)


def test_dynamic_dims_cannot_get_device_buffers(cudart: Any) -> None:
    with pytest.raises(DatasetError, match="static dims"):
        DeviceBatchFeeder([TensorSpec("x", "float32", ("seq", 4))], max_batch=2)
