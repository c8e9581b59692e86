"""Backend selection and the spec checks done before a build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calibrators.calibrate import calibrate
from calibrators.data import CalibrationDataset
from calibrators.spec import minmax
from core.tensorrt import tensorrt_installed
from core.tensors import TensorSpec
from engines.artifacts import read_metadata
from engines.backends.onnxruntime import OnnxRuntimeBackend
from engines.backends.registry import select_backend
from engines.build import build_artifact, validate_profiles
from engines.errors import BackendUnavailableError, SpecError
from engines.graph import normalize
from engines.spec import BackendName, BuildSpec, KeepRules, Precision, ShapeProfile
from tests import zoo

needs_no_tensorrt = pytest.mark.skipif(tensorrt_installed(), reason="tensorrt is installed here")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("build") / "tiny_cnn.onnx"
    onnx.save(zoo.tiny_cnn(), path)
    return path


@pytest.fixture()
def fake_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `tensorrt` package that find_spec sees (it is never imported: selection must not)."""
    pkg = tmp_path / "site" / "tensorrt"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('selection must not import tensorrt')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_stub_only_tensorrt_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tensorrt-stubs installs a `tensorrt` folder of .pyi files: a namespace package, not TensorRT."""
    stubs = tmp_path / "stubs" / "tensorrt"
    stubs.mkdir(parents=True)
    (stubs / "__init__.pyi").write_text("def get_plugin_registry() -> object: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path / "stubs"))
    if tensorrt_installed():
        pytest.skip("a real tensorrt is installed here")
    _, reason = select_backend(BackendName.AUTO)
    assert reason == "auto: tensorrt not installed, using onnxruntime"


def test_onnxruntime_when_asked() -> None:
    backend, reason = select_backend(BackendName.ONNXRUNTIME)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert reason == "onnxruntime requested"


@needs_no_tensorrt
def test_auto_without_tensorrt_picks_onnxruntime() -> None:
    backend, reason = select_backend(BackendName.AUTO)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert "tensorrt not installed" in reason
    assert backend.reason == reason


@needs_no_tensorrt
def test_explicit_tensorrt_without_tensorrt_is_unavailable() -> None:
    with pytest.raises(BackendUnavailableError, match="tensorrt not installed") as info:
        select_backend(BackendName.TENSORRT)
    assert info.value.field == "backend"
    assert "--backend onnxruntime" in info.value.hint


@pytest.mark.usefixtures("fake_tensorrt")
def test_tensorrt_installed_but_no_gpu() -> None:
    from engines.gpu import discover_gpus

    if discover_gpus():
        pytest.skip("this machine has an NVIDIA GPU")
    backend, reason = select_backend(BackendName.AUTO)
    assert isinstance(backend, OnnxRuntimeBackend)
    assert "no NVIDIA GPU found" in reason
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU found"):
        select_backend(BackendName.TENSORRT)


@needs_no_tensorrt
def test_build_artifact_records_why_the_backend_was_chosen(
    model_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model.onnx"
    artifact = build_artifact(model_path, BuildSpec(precision=Precision.FP32), None, out)
    assert artifact.metadata.backend == "onnxruntime"
    assert artifact.metadata.backend_reason == "auto: tensorrt not installed, using onnxruntime"
    assert read_metadata(out) == artifact.metadata


def test_build_artifact_int8_with_table(model_path: Path, tmp_path: Path) -> None:
    images = np.random.default_rng(0).normal(size=(16, 3, 16, 16)).astype(np.float32)
    table = calibrate(model_path, CalibrationDataset.from_arrays({"image": images}), minmax())
    spec = BuildSpec(precision=Precision.INT8, backend=BackendName.ONNXRUNTIME)
    artifact = build_artifact(model_path, spec, table, tmp_path / "int8.onnx")
    assert artifact.metadata.quantized_nodes
    assert artifact.metadata.backend_reason == "onnxruntime requested"


def test_int8_without_table_is_refused(model_path: Path, tmp_path: Path) -> None:
    for precision in (Precision.INT8, Precision.INT8_FP16):
        with pytest.raises(SpecError) as info:
            build_artifact(model_path, BuildSpec(precision=precision), None, tmp_path / "m.onnx")
        assert info.value.field == "table" and precision.value in info.value.message
        assert "--data" in (info.value.hint or "") and "--table" in (info.value.hint or "")
    assert not list(tmp_path.iterdir())


def _profile_error(model_path: Path, tmp_path: Path, **profiles: str) -> SpecError:
    spec = BuildSpec(
        precision=Precision.FP32,
        backend=BackendName.ONNXRUNTIME,
        profiles={k: ShapeProfile.parse(v) for k, v in profiles.items()},
    )
    with pytest.raises(SpecError) as info:
        build_artifact(model_path, spec, None, tmp_path / "m.onnx")
    assert info.value.field == "profiles"
    assert not list(tmp_path.iterdir())
    return info.value


def test_profile_for_unknown_input(model_path: Path, tmp_path: Path) -> None:
    err = _profile_error(model_path, tmp_path, images="1x3x16x16")
    assert "'images'" in err.message and "image" in err.message
    assert "'image'" in err.hint


def test_profile_rank_mismatch(model_path: Path, tmp_path: Path) -> None:
    err = _profile_error(model_path, tmp_path, image="1x3x16")
    assert "rank 3" in err.message and "rank 4" in err.message
    assert "Nx3x16x16" in err.hint


def test_profile_outside_static_dims(model_path: Path, tmp_path: Path) -> None:
    err = _profile_error(model_path, tmp_path, image="1x3x16x16/1x3x32x32/1x3x32x32")
    assert "axis 2" in err.message and "fixed size 16" in err.message
    assert "only symbolic dims can vary" in err.hint


def test_valid_profiles_pass() -> None:
    inputs = [
        TensorSpec("ids", "int64", ("batch", "sequence")),
        TensorSpec("x", "float32", (None, 4)),
    ]
    validate_profiles(
        inputs,
        {"ids": ShapeProfile.parse("1x8/4x64/8x128"), "x": ShapeProfile.parse("1x4/2x4/4x4")},
    )


def test_keep_pattern_matching_no_node(model_path: Path, tmp_path: Path) -> None:
    spec = BuildSpec(
        precision=Precision.FP16, backend=BackendName.ONNXRUNTIME, keep=KeepRules(fp16=("conv4",))
    )
    with pytest.raises(SpecError, match="'conv4'") as info:
        build_artifact(model_path, spec, None, tmp_path / "m.onnx")
    assert info.value.field == "keep"
    assert "conv1" in info.value.hint and "conv3" in info.value.hint
    regex = BuildSpec(
        precision=Precision.FP16,
        backend=BackendName.ONNXRUNTIME,
        keep=KeepRules(int8=("re:attn.*",)),
    )
    with pytest.raises(SpecError, match="re:attn"):
        build_artifact(model_path, regex, None, tmp_path / "m.onnx")


def test_keep_patterns_by_op_type_and_regex_are_accepted(model_path: Path, tmp_path: Path) -> None:
    spec = BuildSpec(
        precision=Precision.FP16,
        backend=BackendName.ONNXRUNTIME,
        keep=KeepRules(fp16=("Gemm", "re:conv[12]")),
    )
    artifact = build_artifact(model_path, spec, None, tmp_path / "m.onnx")
    assert {"fc", "conv1", "conv2"} <= set(artifact.metadata.fp32_nodes)


def test_keep_patterns_see_the_names_given_to_unnamed_nodes(tmp_path: Path) -> None:
    model = zoo.tiny_cnn()
    for node in model.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, path)
    names = [n.name for n in normalize(model).graph.node]
    conv = next(n for n in names if n.startswith("Conv"))
    spec = BuildSpec(
        precision=Precision.FP16, backend=BackendName.ONNXRUNTIME, keep=KeepRules(fp16=(conv,))
    )
    artifact = build_artifact(path, spec, None, tmp_path / "m.onnx")
    assert conv in artifact.metadata.fp32_nodes
