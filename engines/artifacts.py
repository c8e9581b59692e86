"""Artifacts on disk: the built file plus its ``<artifact>.json`` metadata sidecar.

Both files are written to a temporary file in the destination folder, flushed with ``fsync``
and renamed into place, so a reader never sees a half-written artifact or sidecar. The pair is
published in this order:

1. the artifact and the sidecar are written in full to temporary files;
2. a sidecar left from an earlier build at the same path is removed;
3. the artifact is renamed into place, then the sidecar.

So whenever a sidecar exists it describes the artifact beside it (its ``sha256`` and
``size_bytes`` are computed here, from the bytes written). An artifact without a sidecar is an
interrupted build, and :func:`read_metadata` says so. On any error the temporary files, and an
artifact already renamed whose sidecar could not follow, are removed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from pydantic import ValidationError

from core.files import flush, fsync_dir, temp_file
from core.hashing import sha256_file
from engines.backends.base import Artifact, ArtifactMetadata
from engines.errors import BuildError, EngineError

__all__ = [
    "read_metadata",
    "sidecar_path",
    "write_artifact",
    "write_metadata",
]

_CHUNK_BYTES = 1024 * 1024


def sidecar_path(artifact_path: Path) -> Path:
    """Where the metadata of ``artifact_path`` lives: the same name with ``.json`` appended."""
    return artifact_path.with_name(artifact_path.name + ".json")


def write_artifact(data: bytes | Path, out_path: Path, metadata: ArtifactMetadata) -> Artifact:
    """Publish ``data`` (bytes, or a file to copy) at ``out_path`` with its metadata sidecar.

    ``metadata.sha256`` and ``metadata.size_bytes`` are replaced by the values computed from the
    bytes written; pass anything (e.g. ``""`` and ``0``) for them. The source file of a
    ``Path`` is left untouched. Raises :class:`BuildError` when the files cannot be written.
    """
    out_path = Path(out_path)
    folder = out_path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BuildError(
            f"Cannot create the artifact folder {str(folder)!r}: {exc}",
            hint="Choose an output path in a writable folder.",
            field="out",
        ) from exc
    sidecar = sidecar_path(out_path)
    try:
        with temp_file(folder, out_path.name) as (tmp_artifact, fh):
            sha256, size = _copy_hashing(data, fh)
            final = metadata.model_copy(update={"sha256": sha256, "size_bytes": size})
            with temp_file(folder, sidecar.name) as (tmp_sidecar, sfh):
                sfh.write(final.model_dump_json(indent=2).encode())
                flush(sfh)
                _publish(tmp_artifact, out_path, tmp_sidecar, sidecar)
    except OSError as exc:
        raise BuildError(
            f"Cannot write the artifact {str(out_path)!r}: {exc}",
            hint="Check that the output folder is writable and has free space.",
            field="out",
        ) from exc
    return Artifact(path=out_path, metadata_path=sidecar, metadata=final)


def write_metadata(artifact_path: Path, metadata: ArtifactMetadata) -> Artifact:
    """Atomically replace the sidecar of an existing artifact (e.g. to record more context).

    ``sha256`` and ``size_bytes`` must still describe the artifact: this is checked.
    """
    artifact_path = Path(artifact_path)
    actual = sha256_file(artifact_path)
    if actual != metadata.sha256:
        raise BuildError(
            f"The metadata's sha256 does not match {artifact_path.name} ({actual}).",
            hint="Rebuild the artifact instead of editing its metadata.",
        )
    sidecar = sidecar_path(artifact_path)
    try:
        with temp_file(artifact_path.parent, sidecar.name) as (tmp, fh):
            fh.write(metadata.model_dump_json(indent=2).encode())
            flush(fh)
            tmp.replace(sidecar)
            fsync_dir(sidecar.parent)
    except OSError as exc:
        raise BuildError(f"Cannot write the metadata {str(sidecar)!r}: {exc}", field="out") from exc
    return Artifact(path=artifact_path, metadata_path=sidecar, metadata=metadata)


def read_metadata(path: Path) -> ArtifactMetadata:
    """Read the metadata of an artifact; ``path`` is the artifact or its ``.json`` sidecar."""
    path = Path(path)
    sidecar = path if path.suffix == ".json" else sidecar_path(path)
    try:
        text = sidecar.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise EngineError(
            f"No metadata sidecar {sidecar.name!r} beside the artifact.",
            hint="The build was interrupted or the sidecar was not copied; rebuild the artifact.",
            field="artifact",
        ) from exc
    except OSError as exc:
        raise EngineError(f"Cannot read {str(sidecar)!r}: {exc}", field="artifact") from exc
    try:
        return ArtifactMetadata.model_validate_json(text)
    except ValidationError as exc:
        raise EngineError(
            f"{sidecar.name} is not valid artifact metadata: {exc.errors()[0]['msg']}",
            hint="The sidecar was written by another trtforge version or edited; rebuild the artifact.",
            field="artifact",
        ) from exc


def _copy_hashing(data: bytes | Path, fh: BinaryIO) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    if isinstance(data, bytes | bytearray | memoryview):
        chunk = bytes(data)
        fh.write(chunk)
        digest.update(chunk)
        size = len(chunk)
    else:
        try:
            with Path(data).open("rb") as src:
                for chunk in iter(lambda: src.read(_CHUNK_BYTES), b""):
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError as exc:
            raise BuildError(f"The built file {str(data)!r} does not exist.") from exc
    flush(fh)
    return digest.hexdigest(), size


def _publish(tmp_artifact: Path, artifact: Path, tmp_sidecar: Path, sidecar: Path) -> None:
    """Rename both into place: no sidecar ever describes a different artifact (module docstring)."""
    try:
        sidecar.unlink(missing_ok=True)
        tmp_artifact.replace(artifact)
    except OSError as exc:
        raise BuildError(
            f"Cannot write the artifact {str(artifact)!r}: {exc}", field="out"
        ) from exc
    try:
        tmp_sidecar.replace(sidecar)
    except OSError as exc:
        artifact.unlink(missing_ok=True)
        raise BuildError(f"Cannot write the metadata {str(sidecar)!r}: {exc}", field="out") from exc
    fsync_dir(artifact.parent)


