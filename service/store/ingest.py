"""Checking uploaded files before they are stored: ONNX models (plain or zipped with external
data) and calibration datasets. Everything here works on a staging folder; nothing is published.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibrators.archive import ZIP_READ_ERRORS, ArchiveLimits, file_members, open_zip
from calibrators.data import CalibrationDataset
from calibrators.errors import ArchiveError, DatasetError
from calibrators.images import check_preprocess_size
from calibrators.spec import PreprocessSpec
from core.errors import ModelError
from core.tensors import TensorSpec

__all__ = [
    "DATASET_SUFFIXES",
    "StagedDataset",
    "StagedModel",
    "check_operators",
    "dataset_id",
    "is_zip",
    "safe_filename",
    "stage_dataset",
    "stage_model",
    "tensor_specs",
]

DATASET_SUFFIXES = (".npz", ".npy", ".zip")
_MODEL_FILE = "model.onnx"
_ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_ORT_ONLY_HINT = (
    "Ops of ONNX Runtime's own domains (com.microsoft) build with the onnxruntime backend only; "
    "TensorRT builds need standard ONNX ops."
)
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class StagedModel:
    """A checked model in a staging folder."""

    folder: Path
    onnx_filename: str
    external_data: bool
    info: dict[str, Any]
    tensor_names: list[str]


@dataclass(frozen=True)
class StagedDataset:
    """A checked dataset in a staging folder."""

    folder: Path
    data_filename: str
    format: str
    num_samples: int
    inputs: list[dict[str, Any]]
    digest: str


def is_zip(path: Path) -> bool:
    """Whether the file starts like a zip archive."""
    with path.open("rb") as fh:
        return fh.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def stage_model(upload: Path, filename: str, staging: Path, limits: ArchiveLimits) -> StagedModel:
    """Check an uploaded ``.onnx`` (or ``.zip`` of one ``.onnx`` plus its data files).

    The model ends up in ``staging``; raises :class:`ModelError` or :class:`ArchiveError`.
    """
    if is_zip(upload):
        onnx_path = _extract_model_zip(upload, filename, staging, limits)
    else:
        name = safe_filename(filename, _MODEL_FILE)
        onnx_path = staging / (name if name.lower().endswith(".onnx") else f"{name}.onnx")
        shutil.move(upload, onnx_path)
    model, external = _check_model(onnx_path, filename)
    from calibrators.collect import observable_tensors
    from engines.graph.inspect import inspect_model

    info = inspect_model(model)
    described = {
        "opset": info.opset,
        "ir_version": info.ir_version,
        "inputs": [t.model_dump(mode="json") for t in info.inputs],
        "outputs": [t.model_dump(mode="json") for t in info.outputs],
        "dynamic_dims": info.dynamic_dims,
        "op_census": info.op_census,
        "num_nodes": info.num_nodes,
    }
    try:
        tensors = list(observable_tensors(model).tensors)
    except ModelError:
        tensors = []  # shape inference failed: imported tables are then matched by name only
    return StagedModel(
        folder=staging,
        onnx_filename=onnx_path.relative_to(staging).as_posix(),
        external_data=external,
        info=described,
        tensor_names=tensors,
    )


def _extract_model_zip(upload: Path, filename: str, staging: Path, limits: ArchiveLimits) -> Path:
    with open_zip(upload, filename, limits) as archive:
        members = file_members(archive)
        onnx_members = [m for m in members if m.filename.lower().endswith(".onnx")]
        if len(onnx_members) != 1:
            found = ", ".join(m.filename for m in onnx_members) or "none"
            raise ModelError(
                f"{filename} must hold exactly one .onnx file (found: {found}).",
                hint="Zip the model file and its external data files, nothing else.",
                field="file",
            )
        for member in members:
            _extract_member(archive, member, staging, filename)
    return staging / onnx_members[0].filename


def _extract_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, label: str
) -> None:
    target = (dest / info.filename).resolve()
    if not target.is_relative_to(dest.resolve()):  # open_zip refused these already; belt and braces
        raise ArchiveError(f"{label} member {info.filename!r} escapes the archive's folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with archive.open(info) as src, target.open("xb") as out:
            while chunk := src.read(_COPY_CHUNK):
                written += len(chunk)
                if written > info.file_size:
                    break
                out.write(chunk)
    except ZIP_READ_ERRORS as exc:
        raise ArchiveError(f"{label} cannot be extracted ({info.filename}): {exc}.") from exc
    if written != info.file_size:  # headers can lie about sizes: count what really came out
        raise ArchiveError(
            f"{label} member {info.filename!r} is not the {info.file_size:,} bytes it declares."
        )


def _check_model(path: Path, label: str) -> tuple[Any, bool]:
    """The model's skeleton (:mod:`core.skeleton`: the graph without its large weights, so a
    large upload is checked in little memory) and whether it has external data files.

    Refuses escaping external data paths, empty graphs, opsets and ops no backend knows, and
    whatever ``onnx.checker`` refuses (run on the skeleton, whose large tensors point at their
    bytes in the model file, so sizes are checked as for inline data).
    """
    import onnx

    from core.onnxio import check_external_data_paths
    from core.skeleton import load_skeleton

    skeleton = load_skeleton(path)
    model = skeleton.model
    if not model.graph.node:
        raise ModelError(f"{label} has an empty graph (no nodes).", field="file")
    check_external_data_paths(model, path.parent)
    check_operators(model, label)
    copy = path.parent / f".skeleton-{uuid.uuid4().hex}.onnx"  # beside it: data paths resolve
    try:
        copy.write_bytes(model.SerializeToString())
        onnx.checker.check_model(str(copy))
    except Exception as exc:  # onnx.checker.ValidationError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{label} fails onnx.checker: {first.replace(copy.name, path.name)}",
            hint="Re-export the model; check it with `python -m onnx.checker MODEL.onnx`.",
            field="file",
        ) from exc
    finally:
        copy.unlink(missing_ok=True)
    return model, skeleton.external


def check_operators(model: Any, label: str) -> None:
    """Refuse what no backend can build, at upload rather than at build: an opset newer than
    this server's ONNX knows, and ops of domains no backend runs (ONNX Runtime knows the ONNX
    domains and its own, e.g. ``com.microsoft``; TensorRT knows the ONNX domain). Ops defined by
    the model's own functions are fine. :class:`ModelError` naming the node and the reason."""
    known = _known_opsets()
    for entry in model.opset_import:
        domain = entry.domain or ""
        newest = known.get(domain)
        if newest is not None and not 1 <= entry.version <= newest:
            shown = domain or "ai.onnx"
            raise ModelError(
                f"{label} imports opset {entry.version} of {shown!r}; the newest this server "
                f"knows is {newest}.",
                hint="Export the model with an opset this server's ONNX and ONNX Runtime know "
                f"(at most {newest}), e.g. torch.onnx.export(..., opset_version=17).",
                field="file",
            )
    functions = {(f.domain, f.name) for f in model.functions}
    runtime = _runtime_ops()
    for node in _all_nodes(model):
        domain = node.domain or ""
        if domain in _ONNX_DOMAINS or (domain, node.op_type) in functions:
            continue
        if runtime is not None and (domain, node.op_type) in runtime:
            continue
        where = f"node {node.name!r}" if node.name else "a node"
        if runtime is not None and domain in {d for d, _ in runtime}:
            reason = f"ONNX Runtime has no op {node.op_type!r} in domain {domain!r}"
        else:
            reason = f"domain {domain!r} is a custom domain no backend here builds"
        raise ModelError(
            f"{label}: {where} uses op {node.op_type!r} of domain {domain!r}, which no backend "
            f"can build ({reason}).",
            hint="Use standard ONNX ops (custom ops need a plugin trtforge does not load). "
            + _ORT_ONLY_HINT,
            field="file",
        )


def _known_opsets() -> dict[str, int]:
    import onnx

    newest = onnx.helper.VERSION_TABLE[-1]  # (release, IR, ai.onnx, ai.onnx.ml, training)
    default = max(onnx.defs.onnx_opset_version(), int(newest[2]))
    return {"": default, "ai.onnx": default, "ai.onnx.ml": int(newest[3])}


@functools.cache
def _runtime_ops() -> frozenset[tuple[str, str]] | None:
    """(domain, op) pairs ONNX Runtime has schemas for; None when it cannot say here."""
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        return None
    try:
        from onnxruntime.capi import _pybind_state

        schemas = _pybind_state.get_all_operator_schema()
    except (ImportError, AttributeError, RuntimeError):
        return None
    return frozenset((str(s.domain), str(s.name)) for s in schemas)


def _all_nodes(model: Any) -> Iterator[Any]:
    """Nodes of the graph, its subgraphs (If, Loop, Scan bodies) and the model's functions."""
    pending = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    while pending:
        node = pending.pop()
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                pending.extend(attr.g.node)
            for graph in attr.graphs:
                pending.extend(graph.node)


def safe_filename(filename: str, fallback: str) -> str:
    """The base name of an uploaded file, reduced to characters safe in any file system."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename.replace("\\", "/")).name)[-100:]
    return fallback if not name.strip("._") else name


def dataset_id(sha256: str, preprocess: PreprocessSpec | None, input_name: str | None) -> str:
    """A dataset's id: the upload's sha256, mixed with how it is read when that is specified."""
    if preprocess is None and input_name is None:
        return sha256
    how = json.dumps(
        {
            "preprocess": preprocess.model_dump(mode="json") if preprocess else None,
            "input_name": input_name,
        },
        sort_keys=True,
    )
    return hashlib.sha256(f"{sha256}\n{how}".encode()).hexdigest()


def stage_dataset(
    upload: Path,
    filename: str,
    staging: Path,
    *,
    preprocess: PreprocessSpec | None,
    input_name: str | None,
    limits: ArchiveLimits,
    model_inputs: Sequence[TensorSpec] | None,
) -> StagedDataset:
    """Check an uploaded dataset, against a model's inputs when given. Raises DatasetError."""
    suffix = Path(filename).suffix.lower()
    if suffix not in DATASET_SUFFIXES:
        raise DatasetError(
            f"{filename!r} is not a dataset format trtforge reads.",
            hint="Upload a .npz, a .npy (single-input models), a .zip of .npz/.npy shards, "
            "or a .zip of JPEG/PNG images with a preprocessing spec.",
            field="file",
        )
    if preprocess is not None:
        try:
            check_preprocess_size(preprocess, limits.max_preprocessed_pixels)
        except DatasetError as exc:
            raise DatasetError(
                exc.message,
                hint=f"{exc.hint} The server's bound is TRTFORGE_MAX_PREPROCESSED_PIXELS.",
                field=exc.field,
            ) from exc
    data_filename = safe_filename(filename, f"dataset{suffix}")
    target = staging / data_filename
    shutil.move(upload, target)
    if preprocess is not None:
        (staging / "preprocess.json").write_text(preprocess.model_dump_json())
    dataset = CalibrationDataset.open(
        target, preprocess=preprocess, limits=limits, input_name=input_name
    )
    if model_inputs is None:  # its own specs (plus the batch axis): finite, not empty
        model_inputs = [TensorSpec(s.name, s.dtype, ("batch", *s.shape)) for s in dataset.specs]
    checked = dataset.validate(list(model_inputs))
    if preprocess is not None:
        fmt = "images"
    elif suffix == ".zip":
        fmt = "zip"
    else:
        fmt = suffix.lstrip(".")
    return StagedDataset(
        folder=staging,
        data_filename=data_filename,
        format=fmt,
        num_samples=checked.num_samples,
        inputs=tensor_specs(checked.specs),
        digest=checked.digest,
    )


def tensor_specs(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    """TensorSpecs as JSON-able dicts (the API's TensorInfo)."""
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]
