"""The ONNX Runtime backend builds runnable .onnx artifacts with complete metadata."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import minmax
from calibrators.table import CalibrationTable
from core.hashing import sha256_file
from core.tensors import TensorSpec
from engines.artifacts import read_metadata
from engines.backends import onnxruntime as ort_backend
from engines.backends.base import Runner
from engines.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeRunner, cpu_name
from engines.errors import BuildError, RunError, SpecError
from engines.spec import BuildSpec, KeepRules, Precision, ShapeProfile
from tests import zoo


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ortb") / "tiny_cnn.onnx"
    onnx.save(zoo.tiny_cnn(), path)
    return path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(24, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def table(model_path: Path, images: np.ndarray) -> CalibrationTable:
    return calibrate(model_path, CalibrationDataset.from_arrays({"image": images}), minmax())


def _run_original(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"image": images})[0])


def test_fp32_build_is_the_unchanged_model(
    model_path: Path, images: np.ndarray, tmp_path: Path
) -> None:
    backend = OnnxRuntimeBackend(intra_op_threads=1, reason="test")
    stages: list[tuple[str, float]] = []
    spec = BuildSpec(precision=Precision.FP32, backend="onnxruntime")
    out = tmp_path / "fp32.onnx"
    artifact = backend.build(
        model_path, spec, None, out, progress=lambda s, f: stages.append((s, f))
    )
    assert artifact.path == out and out.is_file()
    meta = artifact.metadata
    assert meta == read_metadata(out)
    assert meta.backend == "onnxruntime" and meta.backend_version == ort.__version__
    assert meta.backend_reason == "test"
    assert meta.precision == "fp32" and meta.spec == spec
    assert meta.device == cpu_name()
    assert meta.sha256 == sha256_file(out) and meta.size_bytes == out.stat().st_size
    assert meta.model_sha256 == sha256_file(model_path)
    assert meta.table_sha256 is None and meta.quantized_nodes == []
    assert meta.options["providers"] == ["CPUExecutionProvider"]
    assert meta.options["intra_op_num_threads"] == 1
    assert meta.options["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert meta.build_seconds > 0
    assert stages[0][1] == 0.0 and stages[-1] == ("done", 1.0)
    with backend.load(out) as runner:
        got = runner.run({"image": images})["logits"]
    np.testing.assert_allclose(got, _run_original(model_path, images), rtol=1e-6, atol=1e-6)


def test_int8_build_quantizes_and_records_nodes(
    model_path: Path, images: np.ndarray, table: CalibrationTable, tmp_path: Path
) -> None:
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    spec = BuildSpec(precision=Precision.INT8, keep=KeepRules(int8=("fc",)))
    artifact = backend.build(model_path, spec, table, tmp_path / "int8.onnx")
    meta = artifact.metadata
    assert meta.table_sha256 == table.digest
    assert "conv1" in meta.quantized_nodes
    assert "fc" not in meta.quantized_nodes
    assert "fc" in meta.kept_nodes and "not INT8" in meta.kept_nodes["fc"]
    built = onnx.load(str(artifact.path))
    ops = {n.op_type for n in built.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    with backend.load(artifact.path) as runner:
        got = runner.run({"image": images})["logits"]
    ref = _run_original(model_path, images)
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.98


def test_fp16_build_records_fp32_nodes(
    model_path: Path, images: np.ndarray, tmp_path: Path
) -> None:
    backend = OnnxRuntimeBackend(intra_op_threads=1)
    spec = BuildSpec(precision=Precision.FP16, keep=KeepRules(fp16=("conv1",)))
    artifact = backend.build(model_path, spec, None, tmp_path / "fp16.onnx")
    assert "conv1" in artifact.metadata.fp32_nodes
    assert artifact.metadata.kept_nodes["conv1"].startswith("FP32:")
    with backend.load(artifact.path) as runner:
        assert runner.inputs[0].dtype == "float32"  # graph I/O types unchanged
        got = runner.run({"image": images})["logits"]
    np.testing.assert_allclose(got, _run_original(model_path, images), atol=0.05, rtol=0.05)


def test_int8_without_table_is_refused(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        OnnxRuntimeBackend().build(
            model_path, BuildSpec(precision=Precision.INT8), None, tmp_path / "x.onnx"
        )
    assert info.value.field == "table" and "--table" in (info.value.hint or "")
    assert not (tmp_path / "x.onnx").exists()
    assert list(tmp_path.iterdir()) == []


def test_models_over_2gb_are_refused_clearly(
    model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ort_backend, "MAX_PROTOBUF_BYTES", 1000)  # tiny_cnn is ~10 kB
    with pytest.raises(BuildError, match="limited to 2 GiB") as info:
        OnnxRuntimeBackend().build(
            model_path, BuildSpec(precision=Precision.FP32), None, tmp_path / "big.onnx"
        )
    assert "external" in info.value.hint
    assert list(tmp_path.iterdir()) == []


def test_external_data_model_builds_to_one_file(images: np.ndarray, tmp_path: Path) -> None:
    src = zoo.save_with_external_data(zoo.tiny_cnn(), tmp_path / "src")
    out = tmp_path / "out" / "model.onnx"
    artifact = OnnxRuntimeBackend(intra_op_threads=1).build(
        src, BuildSpec(precision=Precision.FP32), None, out
    )
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.json"]
    with OnnxRuntimeRunner(artifact.path) as runner:
        got = runner.run({"image": images[:2]})["logits"]
    np.testing.assert_allclose(got, _run_original(src, images[:2]), rtol=1e-6, atol=1e-6)


def test_profiles_are_recorded(model_path: Path, tmp_path: Path) -> None:
    spec = BuildSpec(
        precision=Precision.FP32,
        profiles={"image": ShapeProfile.parse("1x3x16x16/4x3x16x16/8x3x16x16")},
    )
    meta = OnnxRuntimeBackend().build(model_path, spec, None, tmp_path / "p.onnx").metadata
    assert meta.profiles == {
        "image": {"min": [1, 3, 16, 16], "opt": [4, 3, 16, 16], "max": [8, 3, 16, 16]}
    }


def test_runner_protocol_inputs_and_timing(model_path: Path, images: np.ndarray) -> None:
    with OnnxRuntimeRunner(model_path, intra_op_threads=1) as runner:
        assert isinstance(runner, Runner)
        assert list(runner.inputs) == [TensorSpec("image", "float32", ("batch", 3, 16, 16))]
        assert list(runner.output_names) == ["logits"]
        timing = runner.timed_run({"image": images[:4]})
        assert timing.latency_ms > 0
        assert timing.gpu_compute_ms == timing.enqueue_ms == timing.latency_ms
        assert timing.h2d_ms == timing.d2h_ms == 0.0
        info = runner.describe()
        assert info["backend"] == "onnxruntime" and info["threads"] == "1"
        assert info["providers"] == "CPUExecutionProvider"
        assert info["device"] == cpu_name()
        assert runner.session_options["intra_op_num_threads"] == 1
        with pytest.raises(RunError, match="Missing input") as missing:
            runner.run({"x": images})
        assert "image" in missing.value.hint
        with pytest.raises(RunError, match="has shape"):  # checked before ONNX Runtime runs
            runner.run({"image": images[:, :2]})
    with pytest.raises(RunError, match="closed"):
        runner.run({"image": images})


def test_default_threads_is_cpu_count(model_path: Path) -> None:
    with OnnxRuntimeRunner(model_path) as runner:
        assert runner.session_options["intra_op_num_threads"] == os.cpu_count()
    assert OnnxRuntimeBackend().intra_op_threads == os.cpu_count()


def test_loading_bad_artifacts_is_a_run_error(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="does not exist"):
        OnnxRuntimeRunner(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(RunError, match="cannot load"):
        OnnxRuntimeBackend().load(junk)


def test_availability_and_version() -> None:
    backend = OnnxRuntimeBackend()
    assert backend.availability().available
    assert backend.version() == ort.__version__
    assert backend.name == "onnxruntime"


def test_int8_weight_levels_follow_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from engines.backends import onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ort_backend, "_cpu_flags", lambda: {"avx2", "fma"})
    assert ort_backend.int8_weight_levels(["CPUExecutionProvider"])[0] == 63
    monkeypatch.setattr(ort_backend, "_cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert ort_backend.int8_weight_levels(["CPUExecutionProvider"])[0] == 127
    assert (
        ort_backend.int8_weight_levels(["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == 127
    )
    monkeypatch.setattr(ort_backend.platform, "machine", lambda: "aarch64")
    assert ort_backend.int8_weight_levels(["CPUExecutionProvider"])[0] == 127


def test_seven_bit_weights_halve_the_weight_scales() -> None:
    from onnx import numpy_helper

    from calibrators.table import CalibrationTable
    from engines.graph.qdq import insert_qdq
    from tests import zoo

    model = zoo.tiny_cnn()
    table = CalibrationTable(
        amax={n: 4.0 for n in ["image", "r1", "res", "r2", "ap", "cat", "flat"]},
        method="minmax",
        parameters={},
        samples=1,
        model_sha256=None,
        dataset_sha256=None,
    )
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def conv1_weight_scale(levels: int) -> np.ndarray:
        out, _ = insert_qdq(model, table, weight_levels=levels)
        inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
        q = next(
            n for n in out.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "conv1.w"
        )
        return inits[q.input[1]]

    expected = np.abs(weights["conv1.w"]).reshape(8, -1).max(axis=1)
    np.testing.assert_allclose(conv1_weight_scale(127), expected / 127, rtol=1e-6)
    np.testing.assert_allclose(conv1_weight_scale(63), expected / 63, rtol=1e-6)
