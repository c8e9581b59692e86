"""Loading ONNX models safely: external-data paths never escape the model's folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx
from onnx.external_data_helper import uses_external_data

from core.errors import ModelError

__all__ = ["check_external_data_paths", "load_onnx", "with_graph"]


def check_external_data_paths(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations that are not plain relative paths inside ``folder``.

    The one rule, at upload and at build alike: a ``location`` must be relative (POSIX and
    Windows spellings), have no drive and no ``..`` part, and resolve (links followed) inside
    ``folder``, to a file that exists. Checked before anything outside is opened.
    """
    root = folder.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        candidate = Path(location)
        resolved = (root / candidate).resolve()
        if not _plain_relative(location) or not resolved.is_relative_to(root):
            raise ModelError(
                f"Initializer {tensor.name!r} points its external data at {location!r}, "
                "outside the model's folder (it must be a plain relative path inside it).",
                hint="Keep external data files beside the .onnx file and refer to them by relative "
                "name (no absolute paths, no '..').",
                field="model",
            )
        if not resolved.is_file():
            raise ModelError(
                f"Initializer {tensor.name!r} needs external data file {location!r}, which is missing.",
                hint="Upload the .onnx together with its data files (for the service: as one .zip).",
                field="model",
            )


def _plain_relative(location: str) -> bool:
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    return not (
        not location
        or posix.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in posix.parts
        or ".." in windows.parts
    )


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    return tensors


def load_onnx(path: Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load ``path``; external data is checked to stay inside its folder before it is read."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError as exc:
        raise ModelError(f"Model file {str(path)!r} does not exist.", field="model") from exc
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for non-ONNX bytes
        raise ModelError(f"{path.name} is not a readable ONNX model: {exc}", field="model") from exc
    if not model.graph.node:
        raise ModelError(f"{path.name} has an empty graph (no nodes).", field="model")
    check_external_data_paths(model, path.parent)
    if load_external_data:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise ModelError(
                f"Cannot read the external data of {path.name}: {exc}", field="model"
            ) from exc
    return model


def with_graph(
    model: onnx.ModelProto,
    *,
    node: Sequence[onnx.NodeProto],
    input: Sequence[onnx.ValueInfoProto],
    output: Sequence[onnx.ValueInfoProto],
    initializer: Sequence[onnx.TensorProto],
) -> onnx.ModelProto:
    """A model like ``model`` (IR version, opsets, functions, domain) whose graph keeps its name,
    value_info and sparse initializers but has these nodes, inputs, outputs and initializers.
    Built without copying ``model`` whole (a large model's weights are not duplicated)."""
    graph = model.graph
    return onnx.ModelProto(
        ir_version=model.ir_version,
        opset_import=model.opset_import,
        functions=model.functions,
        domain=model.domain,
        graph=onnx.GraphProto(
            name=graph.name,
            node=node,
            input=input,
            output=output,
            value_info=graph.value_info,
            initializer=initializer,
            sparse_initializer=graph.sparse_initializer,
        ),
    )
