"""The TensorRT backend end to end: build in the child process, load, run, compare with ONNX
Runtime; the files beside the engine; errors. Needs TensorRT and an NVIDIA GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import minmax
from calibrators.table import CalibrationTable
from engines.backends.tensorrt import TensorRTBackend, TensorRTRunner
from engines.errors import BuildError, EngineError, SpecError
from engines.spec import BuildSpec, Precision, ShapeProfile, TensorRTMode, TensorRTOptions
from tests import zoo

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

PROFILE = {"image": ShapeProfile.parse("1x3x16x16/4x3x16x16/8x3x16x16")}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trt") / "tiny.onnx"
    onnx.save(zoo.tiny_cnn(), path)
    return path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(64, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def table(model_path: Path, images: np.ndarray) -> CalibrationTable:
    return calibrate(model_path, CalibrationDataset.from_arrays({"image": images}), minmax())


def _reference(model_path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["logits"], {"image": batch})[0])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_explicit_fp16_build_runs_like_onnxruntime(
    model_path: Path, images: np.ndarray, tmp_path: Path
) -> None:
    backend = TensorRTBackend(timing_cache_dir=tmp_path / "timing")
    spec = BuildSpec(precision=Precision.FP16, profiles=PROFILE)
    stages: list[str] = []
    artifact = backend.build(
        model_path, spec, None, tmp_path / "m.engine", progress=lambda s, f: stages.append(s)
    )
    assert "building engine" in stages and stages[-1] == "done"
    meta = artifact.metadata
    assert meta.backend == "tensorrt" and meta.mode == "explicit" and meta.precision == "fp16"
    assert meta.backend_version == backend.version()
    assert meta.options["strongly_typed"] is True
    layers = json.loads((tmp_path / "m.engine.layers.json").read_text())
    assert layers.get("Layers"), "the inspector's JSON lists the engine's layers"
    assert (tmp_path / "m.engine.prepared.onnx").is_file()
    assert (tmp_path / "m.engine.build.log").read_text()
    assert list((tmp_path / "timing").glob("*.timing-cache"))
    with backend.load(artifact.path) as runner:
        assert [s.name for s in runner.inputs] == ["image"]
        assert runner.inputs[0].shape == (None, 3, 16, 16)
        for n in (1, 5, 8):  # anywhere in the profile
            out = runner.run({"image": images[:n]})["logits"]
            np.testing.assert_allclose(
                out, _reference(model_path, images[:n]), atol=3e-2, rtol=3e-2
            )
        timing = runner.timed_run({"image": images[:4]})
        assert timing.gpu_compute_ms > 0 and timing.latency_ms >= timing.gpu_compute_ms
        assert runner.describe()["backend"] == "tensorrt"


def test_explicit_int8_build_stays_close_to_fp32(
    model_path: Path, images: np.ndarray, table: CalibrationTable, tmp_path: Path
) -> None:
    spec = BuildSpec(precision=Precision.INT8_FP16, profiles=PROFILE)
    artifact = TensorRTBackend(timing_cache_dir=tmp_path).build(
        model_path, spec, table, tmp_path / "q.engine"
    )
    assert artifact.metadata.table_sha256 == table.digest
    assert artifact.metadata.quantized_nodes
    with TensorRTRunner(artifact.path) as runner:
        out = runner.run({"image": images[:8]})["logits"]
    assert _cosine(out, _reference(model_path, images[:8])) > 0.98


def test_reproduce_script_rebuilds_the_engine(
    model_path: Path, images: np.ndarray, tmp_path: Path
) -> None:
    spec = BuildSpec(precision=Precision.FP16, profiles=PROFILE)
    artifact = TensorRTBackend(timing_cache_dir=tmp_path).build(
        model_path, spec, None, tmp_path / "m.engine"
    )
    rebuilt = tmp_path / "again.engine"
    script = tmp_path / "m.engine.reproduce.py"
    done = subprocess.run(
        [sys.executable, str(script), str(rebuilt)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with TensorRTRunner(artifact.path) as a, TensorRTRunner(rebuilt) as b:
        batch = {"image": images[:4]}
        np.testing.assert_allclose(a.run(batch)["logits"], b.run(batch)["logits"], atol=3e-2)


def test_implicit_int8_serves_the_table_as_tensorrt_cache(
    model_path: Path,
    images: np.ndarray,
    table: CalibrationTable,
    tmp_path: Path,
    tensorrt_version: int,
) -> None:
    spec = BuildSpec(
        precision=Precision.INT8_FP16,
        mode=TensorRTMode.IMPLICIT,
        profiles=PROFILE,
        keep={"int8": ("fc",)},
    )
    backend = TensorRTBackend(timing_cache_dir=tmp_path)
    if tensorrt_version >= 110000:
        with pytest.raises(EngineError, match="TensorRT 11"):
            backend.build(model_path, spec, table, tmp_path / "i.engine")
        return
    artifact = backend.build(model_path, spec, table, tmp_path / "i.engine")
    cache = (tmp_path / "i.engine.calibration.cache").read_text()
    assert cache.startswith(f"TRT-{tensorrt_version}-MinMaxCalibration\n")
    assert artifact.metadata.kept_nodes == {"fc": "pinned to float16 by a keep rule"}
    assert artifact.metadata.options["layers_pinned"] >= 1
    with TensorRTRunner(artifact.path) as runner:
        out = runner.run({"image": images[:8]})["logits"]
    assert _cosine(out, _reference(model_path, images[:8])) > 0.98


def test_parser_errors_name_the_onnx_node(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], name="weird_node", domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    path = tmp_path / "weird.onnx"
    onnx.save(model, path)
    with pytest.raises(BuildError) as info:
        TensorRTBackend(timing_cache_dir=tmp_path).build(
            path, BuildSpec(precision=Precision.FP32), None, tmp_path / "w.engine"
        )
    assert "weird_node" in info.value.message
    assert "Frobnicate" in info.value.message


def test_dynamic_input_without_a_profile_is_a_spec_error(model_path: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="image"):
        TensorRTBackend(timing_cache_dir=tmp_path).build(
            model_path, BuildSpec(precision=Precision.FP16), None, tmp_path / "m.engine"
        )


def test_build_timeout_is_a_build_error(model_path: Path, tmp_path: Path) -> None:
    backend = TensorRTBackend(timing_cache_dir=tmp_path, build_timeout_s=0.5)
    spec = BuildSpec(
        precision=Precision.FP16,
        profiles=PROFILE,
        tensorrt=TensorRTOptions(optimization_level=5),
    )
    with pytest.raises(BuildError, match="did not finish"):
        backend.build(model_path, spec, None, tmp_path / "slow.engine")
    assert not (tmp_path / "slow.engine").exists()


def test_runner_timing_modes(model_path: Path, images: np.ndarray, tmp_path: Path) -> None:
    from engines.backends.base import TimingMode
    from engines.benchmark import benchmark
    from engines.perf_report import BenchmarkOptions

    backend = TensorRTBackend(timing_cache_dir=tmp_path / "timing")
    spec = BuildSpec(precision=Precision.FP16, profiles=PROFILE)
    artifact = backend.build(model_path, spec, None, tmp_path / "m.engine")
    quick = BenchmarkOptions(warmup_ms=50, iterations=20, duration_s=0.2, batch_size=4)
    with backend.load(artifact.path) as runner:
        plain = benchmark(runner, None, quick)
        assert plain.h2d.median_ms > 0 and not plain.cuda_graph
        graph = benchmark(
            runner,
            None,
            quick.model_copy(
                update={"cuda_graph": True, "spin_wait": True, "use_transfers": False}
            ),
        )
        assert graph.spin_wait and not graph.use_transfers
        assert graph.h2d.max_ms < plain.h2d.median_ms  # no copies inside the timed queries
        assert graph.cuda_graph == runner.timing_mode.cuda_graph
        if graph.cuda_graph:
            assert runner.describe()["cuda_graph"] == "yes"
        else:
            assert any("CUDA graph capture failed" in w for w in graph.warnings)
        # run() always copies and returns the right outputs whatever the timing mode
        runner.set_timing_mode(TimingMode(cuda_graph=True, use_transfers=False))
        out = runner.run({"image": images[:4]})["logits"]
        np.testing.assert_allclose(out, _reference(model_path, images[:4]), atol=3e-2, rtol=3e-2)
        # timed graph queries leave the runner usable for plain runs
        runner.set_timing_mode(TimingMode(cuda_graph=True))
        runner.timed_run({"image": images[4:8]})
        again = runner.run({"image": images[4:8]})["logits"]
        np.testing.assert_allclose(again, _reference(model_path, images[4:8]), atol=3e-2, rtol=3e-2)
