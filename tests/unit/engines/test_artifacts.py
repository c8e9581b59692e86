"""Artifacts are published atomically with a matching sidecar, or not at all."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from core.hashing import sha256_file
from engines.artifacts import (
    read_metadata,
    sidecar_path,
    write_artifact,
    write_metadata,
)
from engines.backends.base import ArtifactMetadata
from engines.errors import BuildError, EngineError
from engines.spec import BuildSpec, Precision


def _metadata(**changes: object) -> ArtifactMetadata:
    values: dict[str, object] = {
        "backend": "onnxruntime",
        "backend_version": "1.0",
        "precision": "fp16",
        "device": "test CPU",
        "spec": BuildSpec(precision=Precision.FP16),
        "model_sha256": "ab" * 32,
        "sha256": "",
        "size_bytes": 0,
        "build_seconds": 1.5,
        "created_at": "2025-01-01T00:00:00+00:00",
    }
    values.update(changes)
    return ArtifactMetadata.model_validate(values)


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_write_bytes_publishes_artifact_and_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    data = b"not really onnx but bytes" * 100
    artifact = write_artifact(data, out, _metadata())
    assert out.read_bytes() == data
    assert artifact.path == out
    assert artifact.metadata_path == tmp_path / "model.onnx.json" == sidecar_path(out)
    assert artifact.metadata.sha256 == hashlib.sha256(data).hexdigest()
    assert artifact.metadata.size_bytes == len(data)
    on_disk = json.loads(artifact.metadata_path.read_text())
    assert on_disk["sha256"] == artifact.metadata.sha256
    assert on_disk["spec"]["precision"] == "fp16"
    assert read_metadata(out) == artifact.metadata
    assert read_metadata(artifact.metadata_path) == artifact.metadata
    assert _listing(tmp_path) == ["model.onnx", "model.onnx.json"]  # no temp files left


def test_write_from_path_copies_and_leaves_source(tmp_path: Path) -> None:
    src = tmp_path / "build" / "engine.plan"
    src.parent.mkdir()
    data = os.urandom(2 * 1024 * 1024 + 5)
    src.write_bytes(data)
    out = tmp_path / "out" / "nested" / "model.engine"
    artifact = write_artifact(src, out, _metadata(backend="tensorrt"))
    assert src.read_bytes() == data
    assert out.read_bytes() == data
    assert artifact.metadata.sha256 == sha256_file(out)
    assert artifact.metadata.size_bytes == len(data)


def test_overwrite_replaces_both_files(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    write_artifact(b"first", out, _metadata(build_seconds=1.0))
    second = write_artifact(b"second!", out, _metadata(build_seconds=2.0))
    assert out.read_bytes() == b"second!"
    assert read_metadata(out).build_seconds == 2.0
    assert read_metadata(out).sha256 == second.metadata.sha256 == sha256_file(out)


def test_failure_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(BuildError, match="No space left"):
        write_artifact(b"data", tmp_path / "model.onnx", _metadata())
    assert _listing(tmp_path) == []


def test_failure_renaming_sidecar_removes_the_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_replace = Path.replace

    def replace(self: Path, target: str | os.PathLike[str]) -> Path:
        if str(target).endswith(".json"):
            raise OSError(5, "I/O error")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(BuildError, match="metadata"):
        write_artifact(b"data", tmp_path / "model.onnx", _metadata())
    assert _listing(tmp_path) == []


def test_failure_keeps_no_stale_sidecar_for_a_new_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sidecar on disk always describes the artifact beside it, even after a failed rebuild."""
    out = tmp_path / "model.onnx"
    write_artifact(b"old build", out, _metadata())
    real_replace = Path.replace

    def replace(self: Path, target: str | os.PathLike[str]) -> Path:
        if str(target).endswith(".json"):
            raise OSError(5, "I/O error")
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", replace)
    with pytest.raises(BuildError):
        write_artifact(b"new build", out, _metadata())
    for name in _listing(tmp_path):
        assert not name.endswith(".tmp")
    if sidecar_path(out).exists():
        assert read_metadata(out).sha256 == sha256_file(out)


def test_missing_source_file_is_a_build_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BuildError, match="does not exist"):
        write_artifact(tmp_path / "missing.plan", out / "model.engine", _metadata())
    assert _listing(out) == []


def test_read_metadata_without_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"orphan")
    with pytest.raises(EngineError, match="No metadata sidecar") as info:
        read_metadata(out)
    assert "rebuild" in info.value.hint


def test_read_metadata_rejects_invalid_json(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"x")
    sidecar_path(out).write_text('{"backend": "onnxruntime"}')
    with pytest.raises(EngineError, match="not valid artifact metadata"):
        read_metadata(out)


def test_write_metadata_updates_sidecar_but_checks_sha(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    artifact = write_artifact(b"bytes", out, _metadata())
    updated = artifact.metadata.model_copy(
        update={"backend_reason": "auto: tensorrt not installed"}
    )
    write_metadata(out, updated)
    assert read_metadata(out).backend_reason == "auto: tensorrt not installed"
    with pytest.raises(BuildError, match="sha256"):
        write_metadata(out, updated.model_copy(update={"sha256": "0" * 64}))
    assert read_metadata(out) == updated
    assert _listing(tmp_path) == ["model.onnx", "model.onnx.json"]
