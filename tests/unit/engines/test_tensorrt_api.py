"""engines/backends/tensorrt*.py without TensorRT: the API surface against the real 10.x and
11.x bindings (and the stubs' classes), the reproduce scripts, the build-process supervision, and
the parent's preparation of a build."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import json
import sys
import time
from pathlib import Path

import onnx
import pytest

import engines.gpu
from calibrators.table import CalibrationTable, TensorRTAlgorithm
from core.tensorrt import tensorrt_installed
from engines.backends import tensorrt as backend
from engines.backends import tensorrt_support as support
from engines.backends.base import Backend
from engines.backends.tensorrt_job import (
    BuildJob,
    render_reproduce_script,
    run_build_process,
)
from engines.errors import BackendUnavailableError, BuildError, EngineError, SpecError
from engines.gpu import GpuInfo
from engines.spec import (
    BuildSpec,
    KeepRules,
    Precision,
    ShapeProfile,
    TensorRTMode,
    TensorRTOptions,
)
from tests import trt_surface, zoo

ROOT = Path(__file__).resolve().parents[3]
DOORS = ("engines/backends/tensorrt.py", "engines/backends/tensorrt_runner.py")
GPU = GpuInfo(
    index=0,
    name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    memory_total_bytes=80 * 2**30,
    driver_version="550.54.15",
    cuda_version="12.4",
)


def _job(mode: TensorRTMode, **changes: object) -> BuildJob:
    fields: dict[str, object] = {
        "onnx_path": "/models/m.onnx",
        "mode": mode,
        "precision": Precision.INT8_FP16,
        "profiles": {"image": ShapeProfile.parse("1x3x16x16/8x3x16x16/32x3x16x16")},
        "options": TensorRTOptions(
            workspace_bytes=2**30,
            optimization_level=4,
            hardware_compatibility="ampere_plus",
            version_compatible=True,
        ),
        "engine_path": "/w/engine.plan",
        "layers_path": "/w/layers.json",
        "result_path": "/w/result.json",
    }
    fields.update(changes)
    return BuildJob.model_validate(fields)


@pytest.fixture(scope="module")
def door_uses() -> list[trt_surface.Use]:
    uses: list[trt_surface.Use] = []
    for rel in DOORS:
        found, unknown = trt_surface.collect_uses((ROOT / rel).read_text(), rel)
        assert unknown == [], f"add these factory methods to trt_surface.RETURNS: {unknown}"
        uses += found
    return uses


@pytest.fixture(scope="module")
def script_uses() -> dict[str, list[trt_surface.Use]]:
    scripts = {
        "explicit": render_reproduce_script(
            _job(TensorRTMode.EXPLICIT),
            "m.engine",
            onnx_name="m.engine.prepared.onnx",
            cache_name=None,
        ),
        "implicit": render_reproduce_script(
            _job(
                TensorRTMode.IMPLICIT,
                calibrator=TensorRTAlgorithm.MINMAX,
                layer_precisions={"conv1": "float32"},
            ),
            "m.engine",
            onnx_name=None,
            cache_name="m.engine.calibration.cache",
        ),
    }
    out = {}
    for mode, text in scripts.items():
        found, unknown = trt_surface.collect_uses(text, f"{mode}.reproduce.py")
        assert unknown == []
        out[mode] = found
    return out


# -- the collector itself ----------------------------------------------------------------------

SAMPLE = """
def build(path):
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    layer = network.get_layer(0)
    outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
    kinds = [t.dtype for t in outputs]
    thing = builder.create_mystery()
    return kinds

def _pin_implicit(config):
    import tensorrt
    config.set_flag(tensorrt.BuilderFlag.INT8)

class Holder:
    def go(self):
        return self._engine.num_io_tensors
"""


def test_collector_follows_objects_through_factories_lists_and_parameters() -> None:
    uses, unknown = trt_surface.collect_uses(SAMPLE, "sample.py")
    seen = {(u.kind, u.owner, u.names, u.implicit_only) for u in uses}
    assert ("module", None, ("Logger", "WARNING"), False) in seen
    assert ("module", None, ("Builder",), False) in seen
    assert ("member", "Builder", ("create_network",), False) in seen
    assert ("member", "INetworkDefinition", ("get_layer",), False) in seen
    assert ("member", "ILayer", ("num_outputs",), False) in seen
    assert ("member", "ITensor", ("dtype",), False) in seen  # through the list comprehension
    assert ("member", "IBuilderConfig", ("set_flag",), True) in seen  # parameter name
    assert ("module", None, ("BuilderFlag", "INT8"), True) in seen  # any alias of tensorrt
    assert ("member", "ICudaEngine", ("num_io_tensors",), False) in seen  # self._engine
    assert unknown == ["Builder.create_mystery (sample.py:10)"]


def test_checks_report_names_the_bindings_lack() -> None:
    bindings = trt_surface.require_bindings(10)
    uses, _ = trt_surface.collect_uses(
        "def f(builder):\n    import tensorrt as trt\n    builder.build_engine_v9(trt.BuilderFlag.FP64)\n",
        "bad.py",
    )
    missing = trt_surface.missing_in_bindings(uses, bindings, skip_implicit=False)
    assert any("'build_engine_v9'" in m for m in missing)
    assert any("'FP64'" in m for m in missing)


# -- the doors against the real bindings -------------------------------------------------------


def test_collector_sees_the_whole_build_and_run_path(door_uses: list[trt_surface.Use]) -> None:
    members = {(u.owner, u.names[0]) for u in door_uses if u.kind == "member"}
    for expected in [
        ("Builder", "create_network"),
        ("Builder", "build_serialized_network"),
        ("OnnxParser", "parse_from_file"),
        ("ParserError", "node_name"),
        ("IBuilderConfig", "set_memory_pool_limit"),
        ("IBuilderConfig", "builder_optimization_level"),
        ("IBuilderConfig", "hardware_compatibility_level"),
        ("IBuilderConfig", "create_timing_cache"),
        ("IBuilderConfig", "set_timing_cache"),
        ("ITimingCache", "combine"),
        ("IOptimizationProfile", "set_shape"),
        ("EngineInspector", "get_engine_information"),
        ("IExecutionContext", "execute_async_v3"),
        ("IExecutionContext", "set_tensor_address"),
        ("IExecutionContext", "set_input_shape"),
        ("ICudaEngine", "get_tensor_mode"),
        ("IBuilderConfig", "int8_calibrator"),
        ("ILayer", "precision"),
    ]:
        assert expected in members, expected
    chains = {u.names for u in door_uses if u.kind == "module"}
    assert ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED") in chains
    assert ("LayerInformationFormat", "JSON") in chains
    assert ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS") in chains
    assert len(door_uses) > 60


def test_extractor_reads_the_real_bindings() -> None:
    trt10 = trt_surface.require_bindings(10)
    trt11 = trt_surface.require_bindings(11)
    for name in ("IInt8EntropyCalibrator2", "build_serialized_network", "STRONGLY_TYPED", "nptype"):
        assert trt10.has(name), name
    for name in ("build_serialized_network", "STRONGLY_TYPED", "execute_async_v3", "OnnxParser"):
        assert trt11.has(name), name
    for removed in ("IInt8EntropyCalibrator2", "int8_calibrator", "OBEY_PRECISION_CONSTRAINTS"):
        assert not trt11.has(removed), removed
    assert not trt10.has("NotATensorRTName")


def test_every_tensorrt_name_exists_in_tensorrt10(door_uses: list[trt_surface.Use]) -> None:
    bindings = trt_surface.require_bindings(10)
    assert trt_surface.missing_in_bindings(door_uses, bindings, skip_implicit=False) == []


def test_explicit_path_names_exist_in_tensorrt11(door_uses: list[trt_surface.Use]) -> None:
    bindings = trt_surface.require_bindings(11)
    assert trt_surface.missing_in_bindings(door_uses, bindings, skip_implicit=True) == []
    # and the split matters: the implicit path does use what TensorRT 11 removed
    implicit = [u for u in door_uses if u.implicit_only]
    assert trt_surface.missing_in_bindings(implicit, bindings, skip_implicit=False)


def test_members_belong_to_their_classes_in_the_stubs(door_uses: list[trt_surface.Use]) -> None:
    stubs = trt_surface.require_stubs()
    assert trt_surface.missing_in_stubs(door_uses, stubs) == []


def test_reproduce_scripts_use_real_tensorrt_names(
    script_uses: dict[str, list[trt_surface.Use]],
) -> None:
    trt10 = trt_surface.require_bindings(10)
    trt11 = trt_surface.require_bindings(11)
    stubs = trt_surface.require_stubs()
    for uses in script_uses.values():
        assert trt_surface.missing_in_bindings(uses, trt10, skip_implicit=False) == []
        assert trt_surface.missing_in_stubs(uses, stubs) == []
    explicit = script_uses["explicit"]
    assert trt_surface.missing_in_bindings(explicit, trt11, skip_implicit=True) == []
    overrides = {u.names[0] for u in script_uses["implicit"] if u.kind == "override"}
    assert {"get_batch", "read_calibration_cache", "write_calibration_cache"} <= overrides
    assert ("IInt8MinMaxCalibrator",) in {u.names for u in script_uses["implicit"]}


# -- reproduce scripts -------------------------------------------------------------------------


def test_reproduce_script_carries_the_build_settings() -> None:
    text = render_reproduce_script(
        _job(TensorRTMode.EXPLICIT), "m.engine", onnx_name="m.engine.prepared.onnx", cache_name=None
    )
    tree = ast.parse(text)
    constants = {
        t.id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id.isupper() and t.id not in ("HERE", "ONNX")
    }
    assert constants["MODE"] == "explicit"
    assert constants["PROFILES"] == {
        "image": {"min": [1, 3, 16, 16], "opt": [8, 3, 16, 16], "max": [32, 3, 16, 16]}
    }
    assert constants["WORKSPACE_BYTES"] == 2**30
    assert constants["OPTIMIZATION_LEVEL"] == 4
    assert constants["HARDWARE_COMPATIBILITY"] == "ampere_plus"
    assert constants["VERSION_COMPATIBLE"] is True
    assert constants["CALIBRATION_CACHE"] is None
    assert "ONNX = HERE / 'm.engine.prepared.onnx'" in text


def test_implicit_reproduce_script_points_at_the_original_model_and_cache() -> None:
    job = _job(TensorRTMode.IMPLICIT, layer_precisions={"conv1": "float32", "fc": "float16"})
    text = render_reproduce_script(job, "m.engine", onnx_name=None, cache_name="m.engine.cache")
    compile(text, "m.engine.reproduce.py", "exec")
    assert "ONNX = Path('/models/m.onnx')" in text
    assert "CALIBRATION_CACHE = HERE / 'm.engine.cache'" in text
    assert "LAYER_PRECISIONS = {'conv1': 'float32', 'fc': 'float16'}" in text
    assert "base = trt.IInt8EntropyCalibrator2" in text  # the default algorithm


# -- small pure helpers ------------------------------------------------------------------------


def test_implicit_mode_is_refused_on_tensorrt11() -> None:
    with pytest.raises(EngineError) as info:
        support.check_mode_supported(TensorRTMode.IMPLICIT, 110400)
    assert "explicit" in info.value.hint
    assert info.value.field == "mode"
    support.check_mode_supported(TensorRTMode.IMPLICIT, 101601)
    support.check_mode_supported(TensorRTMode.EXPLICIT, 110400)


def test_parser_errors_name_the_onnx_nodes() -> None:
    problems = [
        support.ParserProblem(
            node=7,
            node_name="/encoder/Attention_3",
            operator="Attention",
            code="ErrorCode.UNSUPPORTED_NODE",
            description="No importer registered for op: Attention",
        ),
        support.ParserProblem(node=9, node_name="", operator="", code="X", description="boom"),
    ]
    message = support.parser_error_message(problems)
    assert "node '/encoder/Attention_3' (Attention): No importer registered" in message
    assert "node #9: boom" in message
    assert "without reporting" in support.parser_error_message([])


def test_layers_map_back_to_onnx_nodes() -> None:
    assert support.onnx_node_of_layer("/conv1/Conv", "[ONNX Layer: /conv1/Conv]") == "/conv1/Conv"
    assert support.onnx_node_of_layer("/fc/Gemm_1", "[ONNX Layer: /fc/Gemm]") == "/fc/Gemm"
    assert support.onnx_node_of_layer("conv1", "") == "conv1"


def test_timing_cache_files_are_keyed_by_gpu_and_tensorrt_version(tmp_path: Path) -> None:
    a = support.timing_cache_file(tmp_path, "NVIDIA H100 80GB HBM3-sm9.0", "10.13.3.9")
    assert a == tmp_path / "NVIDIA-H100-80GB-HBM3-sm9.0-trt10.13.3.9.timing-cache"
    assert a != support.timing_cache_file(tmp_path, "NVIDIA H100 80GB HBM3-sm9.0", "10.16.1")
    assert a != support.timing_cache_file(tmp_path, "NVIDIA L4-sm8.9", "10.13.3.9")


def test_side_files_sit_beside_the_artifact(tmp_path: Path) -> None:
    files = support.side_files(tmp_path / "m.engine")
    assert files["reproduce.py"] == tmp_path / "m.engine.reproduce.py"
    assert files["layers.json"] == tmp_path / "m.engine.layers.json"


# -- the build process, supervised -------------------------------------------------------------


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_build_timeout_kills_the_child_and_keeps_its_log(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(BuildError) as info:
        run_build_process(
            _child("import time; print('building...', flush=True); time.sleep(60)"),
            timeout_s=1.0,
            log_path=tmp_path / "build.log",
            result_path=tmp_path / "result.json",
        )
    assert time.monotonic() - start < 20
    assert "did not finish within 1 s" in info.value.message
    assert "building..." in info.value.log
    assert "building..." in (tmp_path / "build.log").read_text()


def test_a_crashing_build_becomes_a_build_error_with_the_log(tmp_path: Path) -> None:
    with pytest.raises(BuildError) as info:
        run_build_process(
            _child("import os; print('parsing', flush=True); os.abort()"),
            timeout_s=60,
            log_path=tmp_path / "build.log",
            result_path=tmp_path / "result.json",
        )
    assert "crashed (SIGABRT)" in info.value.message
    assert "parsing" in info.value.log


def test_an_error_the_child_reports_keeps_its_class(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    record = {
        "error": "SpecError",
        "message": "no profile for 'x'",
        "hint": "h",
        "field": "profiles",
    }
    code = (
        f"import json, sys; open({str(result)!r}, 'w').write({json.dumps(record)!r}); sys.exit(2)"
    )
    with pytest.raises(SpecError) as info:
        run_build_process(_child(code), timeout_s=60, log_path=tmp_path / "l", result_path=result)
    assert info.value.field == "profiles"
    assert info.value.hint == "h"


def test_progress_lines_are_reported_and_the_result_returned(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    code = (
        "import json\n"
        "print('TRTFORGE-PROGRESS 0.20 building engine', flush=True)\n"
        "print('[TRT] [I] some TensorRT chatter', flush=True)\n"
        f"open({str(result)!r}, 'w').write(json.dumps({{'tensorrt_version': '10.16.1'}}))\n"
    )
    seen: list[tuple[str, float]] = []
    out = run_build_process(
        _child(code),
        timeout_s=60,
        log_path=tmp_path / "build.log",
        result_path=result,
        progress=lambda stage, fraction: seen.append((stage, fraction)),
    )
    assert out == {"tensorrt_version": "10.16.1"}
    assert seen == [("building engine", 0.2)]
    assert "TensorRT chatter" in (tmp_path / "build.log").read_text()


def test_child_exiting_without_a_result_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="exited without writing its result"):
        run_build_process(
            _child("print('hi')"), timeout_s=60, log_path=tmp_path / "l", result_path=tmp_path / "r"
        )


@pytest.mark.skipif(tensorrt_installed(), reason="TensorRT is installed: the child would build")
def test_the_real_build_child_reports_missing_tensorrt(tmp_path: Path) -> None:
    job = _job(
        TensorRTMode.EXPLICIT,
        onnx_path=str(tmp_path / "m.onnx"),
        engine_path=str(tmp_path / "engine.plan"),
        layers_path=str(tmp_path / "layers.json"),
        result_path=str(tmp_path / "result.json"),
    )
    job_path = tmp_path / "job.json"
    job_path.write_text(job.model_dump_json())
    with pytest.raises(BackendUnavailableError) as info:
        run_build_process(
            [sys.executable, "-m", "engines.backends.tensorrt", str(job_path)],
            timeout_s=120,
            log_path=tmp_path / "build.log",
            result_path=Path(job.result_path),
        )
    assert "TensorRT" in info.value.message
    assert "pypi.nvidia.com" in info.value.hint


# -- the backend's parent side -----------------------------------------------------------------


def test_backend_satisfies_the_protocol_and_reports_availability(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trt: Backend = backend.TensorRTBackend(device=0)
    assert trt.name == "tensorrt"
    real = importlib.util.find_spec

    def no_tensorrt(name: str, package: str | None = None) -> importlib.machinery.ModuleSpec | None:
        return None if name == "tensorrt" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", no_tensorrt)
    assert trt.availability().available is False
    assert trt.availability().reason == "tensorrt is not installed"
    with pytest.raises(BackendUnavailableError, match="not installed"):
        trt.version()
    with pytest.raises(BackendUnavailableError, match="cannot build here"):
        trt.build(Path("m.onnx"), BuildSpec(precision=Precision.FP16), None, Path("m.engine"))


def test_int8_without_a_table_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as info:
        backend.TensorRTBackend().build(Path("m.onnx"), BuildSpec(), None, Path("m.engine"))
    assert info.value.field == "table"


def test_no_gpu_means_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "tensorrt_installed", lambda: True)
    monkeypatch.setattr(engines.gpu, "discover_gpus", lambda: [GPU.model_copy(update={"index": 1})])
    result = backend.TensorRTBackend(device=0).availability()
    assert result.available is False
    assert "index 0" in result.reason
    ok = backend.TensorRTBackend(device=1).availability()
    assert ok.available and "H100" in ok.reason


def test_implicit_preparation_writes_the_cache_and_pins_kept_nodes(tmp_path: Path) -> None:
    model_path = tmp_path / "tiny.onnx"
    onnx.save(zoo.tiny_cnn(), model_path)
    table = CalibrationTable(amax={"image": 2.0, "c1": 4.0}, method="minmax")
    spec = BuildSpec(
        precision=Precision.INT8_FP16,
        mode=TensorRTMode.IMPLICIT,
        keep=KeepRules(int8=("conv1", "re:relu.*"), fp16=("fc",)),
        profiles={"image": ShapeProfile.parse("1x3x16x16/4x3x16x16/8x3x16x16")},
    )
    trt = backend.TensorRTBackend(timing_cache_dir=tmp_path / "timing")
    job, (quantized, kept, fp32) = trt._prepare(model_path, spec, table, tmp_path, GPU, "m.plan")
    assert job.layer_precisions == {
        "conv1": "float16",
        "relu1": "float16",
        "relu2": "float16",
        "fc": "float32",
    }
    assert job.calibrator is TensorRTAlgorithm.MINMAX
    assert job.calibration_cache == str(tmp_path / "m.plan.calibration.cache")
    assert Path(job.calibration_cache).read_text().startswith("TRT-101303-MinMaxCalibration\n")
    assert job.onnx_path == str(model_path)
    assert job.gpu_key == "NVIDIA H100 80GB HBM3-sm9.0"
    assert job.timing_cache_folder == str(tmp_path / "timing")
    assert quantized == [] and fp32 == ["fc"]
    assert set(kept) == {"conv1", "relu1", "relu2", "fc"}
    # the job survives its trip to the child as JSON
    assert BuildJob.model_validate_json(job.model_dump_json()) == job


def test_int8_only_pins_kept_nodes_to_fp32(tmp_path: Path) -> None:
    model_path = tmp_path / "tiny.onnx"
    onnx.save(zoo.tiny_cnn(), model_path)
    spec = BuildSpec(
        precision=Precision.INT8,
        mode=TensorRTMode.IMPLICIT,
        keep=KeepRules(int8=("Gemm",), fp16=("conv1",)),  # fp16 rules mean nothing without FP16
        tensorrt=TensorRTOptions(timing_cache=False),
    )
    trt = backend.TensorRTBackend()
    job, _ = trt._prepare(model_path, spec, CalibrationTable(amax={"x": 1.0}), tmp_path, GPU)
    assert job.layer_precisions == {"fc": "float32"}
    assert job.timing_cache_folder is None


def test_inputs_are_published_beside_the_artifact_under_the_names_they_were_written(
    tmp_path: Path,
) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "m.engine.prepared.onnx").write_bytes(b"model")
    (work / "m.engine.prepared.onnx.data").write_bytes(b"weights")  # external data keeps its name
    job = _job(TensorRTMode.EXPLICIT, onnx_path=str(work / "m.engine.prepared.onnx"))
    published = support.publish_build_inputs(job, support.side_files(out / "m.engine"))
    assert published == {"prepared_onnx": "m.engine.prepared.onnx"}
    assert sorted(p.name for p in out.iterdir()) == [
        "m.engine.prepared.onnx",
        "m.engine.prepared.onnx.data",
    ]
    assert not list(work.iterdir())


def test_explicit_preparation_writes_the_qdq_onnx_tensorrt_will_parse(tmp_path: Path) -> None:
    import numpy as np

    from calibrators.calibrate import calibrate
    from calibrators.data import CalibrationDataset
    from calibrators.spec import minmax

    model_path = tmp_path / "tiny.onnx"
    onnx.save(zoo.tiny_cnn(), model_path)
    images = np.random.default_rng(0).normal(size=(16, 3, 16, 16)).astype(np.float32)
    table = calibrate(model_path, CalibrationDataset.from_arrays({"image": images}), minmax())
    spec = BuildSpec(
        precision=Precision.INT8_FP16, profiles={"image": ShapeProfile.parse("1x3x16x16")}
    )
    trt = backend.TensorRTBackend(timing_cache_dir=tmp_path / "timing")
    job, (quantized, _, _) = trt._prepare(model_path, spec, table, tmp_path, GPU, "m.engine")
    assert job.mode is TensorRTMode.EXPLICIT
    assert job.onnx_path == str(tmp_path / "m.engine.prepared.onnx")
    prepared = onnx.load(job.onnx_path)
    ops = {n.op_type for n in prepared.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Cast"} <= ops
    assert "conv1" in quantized
    assert job.calibration_cache is None and job.layer_precisions == {}
