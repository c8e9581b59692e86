"""The backend registry: one entry per backend, auto's preference, artifacts opened by their
sidecar."""

from __future__ import annotations

from pathlib import Path

import onnx

from engines.backends.onnxruntime import OnnxRuntimeRunner
from engines.backends.registry import (
    AUTO_PREFERENCE,
    BACKENDS,
    backend_for_artifact,
    open_artifact,
    select_backend,
)
from engines.build import build_artifact
from engines.names import BackendName
from engines.spec import BuildSpec
from tests import zoo


def test_every_backend_name_has_one_entry_and_auto_tries_them_all() -> None:
    named = {name for name in BackendName if name is not BackendName.AUTO}
    assert set(BACKENDS) == named == set(AUTO_PREFERENCE)
    suffixes = [entry.artifact_suffix for entry in BACKENDS.values()]
    assert len(set(suffixes)) == len(suffixes)
    for name, entry in BACKENDS.items():
        assert entry.name is name
        if entry.missing() is None:
            backend, reason = select_backend(name)
            assert backend.name == name.value and backend.artifact_suffix == entry.artifact_suffix
            assert reason == f"{name.value} requested"


def test_artifacts_open_with_the_backend_their_sidecar_names(tmp_path: Path) -> None:
    model = tmp_path / "tiny.onnx"
    onnx.save(zoo.tiny_cnn(), model)
    artifact = build_artifact(
        model, BuildSpec(precision="fp16", backend="onnxruntime"), None, tmp_path / "a.onnx"
    )
    assert backend_for_artifact(artifact.path) is BackendName.ONNXRUNTIME
    with open_artifact(artifact.path) as runner:
        assert isinstance(runner, OnnxRuntimeRunner)
        assert list(runner.output_names) == ["logits"]
    assert backend_for_artifact(model) is BackendName.ONNXRUNTIME  # bare model, no sidecar
    assert backend_for_artifact(tmp_path / "x.engine") is BackendName.TENSORRT
