"""Build an artifact: check the spec against the model, let the chosen backend build.

The backend comes from :func:`engines.backends.registry.select_backend`: ``auto`` picks TensorRT
when the ``tensorrt`` package is installed (checked with ``importlib.util.find_spec``, never by
importing it; ``tensorrt-stubs`` alone does not count) and NVML finds an NVIDIA GPU, else ONNX
Runtime; the reason is recorded in the artifact's metadata (``backend_reason``).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from core.onnxio import load_onnx
from core.tensors import TensorSpec, model_input_specs
from engines.artifacts import write_metadata
from engines.backends.base import Artifact, Backend, ProgressFn
from engines.backends.registry import select_backend
from engines.errors import SpecError
from engines.graph.prequantized import is_prequantized
from engines.spec import BuildSpec, ShapeProfile, node_matches

if TYPE_CHECKING:
    import onnx

    from calibrators.table import CalibrationTable

__all__ = [
    "build_artifact",
    "validate_keep_patterns",
    "validate_profiles",
]


def build_artifact(
    model_path: Path,
    spec: BuildSpec,
    table: CalibrationTable | None,
    out_path: Path,
    *,
    progress: ProgressFn | None = None,
    backend: tuple[Backend, str] | None = None,
    checked: bool = False,
) -> Artifact:
    """Check ``spec`` against the model, then build ``out_path`` (+ sidecar) with its backend.

    ``backend`` is the (backend, reason) already chosen by :func:`select_backend` (a workflow
    chooses once); ``checked`` says the spec was already checked against the model.

    Raises :class:`SpecError` for INT8 without a table, profiles that do not fit the model's
    inputs and keep patterns that match no node; :class:`BackendUnavailableError` when the
    requested backend cannot run here.
    """
    if not checked:
        model = load_onnx(Path(model_path), load_external_data=False)
        if table is None and not is_prequantized(model):
            spec.precision.require_table(table)
        validate_profiles(model_input_specs(model), spec.profiles)
        validate_keep_patterns(model, spec)
        del model
    chosen, reason = backend or select_backend(spec.backend)
    artifact = chosen.build(Path(model_path), spec, table, Path(out_path), progress=progress)
    if artifact.metadata.backend_reason != reason:
        metadata = artifact.metadata.model_copy(update={"backend_reason": reason})
        artifact = write_metadata(artifact.path, metadata)
    return artifact


def validate_profiles(inputs: list[TensorSpec], profiles: dict[str, ShapeProfile]) -> None:
    """Each profile must name a model input, have its rank, and keep its static dims."""
    by_name = {spec.name: spec for spec in inputs}
    for name, profile in profiles.items():
        spec = by_name.get(name)
        if spec is None:
            close = difflib.get_close_matches(name, list(by_name), n=3)
            raise SpecError(
                f"The shape profile names input {name!r}, which the model does not have "
                f"(inputs: {', '.join(by_name) or 'none'}).",
                hint=f"Did you mean {' or '.join(map(repr, close))}?"
                if close
                else "Use the model's input names in --shapes NAME:MIN/OPT/MAX.",
                field="profiles",
            )
        if len(profile.min) != len(spec.shape):
            raise SpecError(
                f"The shape profile of input {name!r} has rank {len(profile.min)} but the input "
                f"has rank {len(spec.shape)} (shape {_fmt_shape(spec.shape)}).",
                hint=f"Give {len(spec.shape)} dims per shape, e.g. {_example(spec.shape)}.",
                field="profiles",
            )
        for axis, dim in enumerate(spec.shape):
            if not isinstance(dim, int) or dim <= 0:
                continue
            given = {profile.min[axis], profile.opt[axis], profile.max[axis]}
            if given != {dim}:
                raise SpecError(
                    f"Input {name!r} has a fixed size {dim} on axis {axis} (shape "
                    f"{_fmt_shape(spec.shape)}) but the profile asks for "
                    f"{profile.min[axis]}/{profile.opt[axis]}/{profile.max[axis]}.",
                    hint=f"Use {dim} on axis {axis} in min, opt and max, e.g. {_example(spec.shape)}; "
                    "only symbolic dims can vary.",
                    field="profiles",
                )


def validate_keep_patterns(model: onnx.ModelProto, spec: BuildSpec) -> None:
    """Every keep pattern must match at least one node (by name, op type or ``re:`` regex).

    Unnamed nodes are matched by the names the graph passes give them (``<OpType>_<index>``).
    """
    if not (spec.keep.int8 or spec.keep.fp16):
        return
    nodes = [(n.name, n.op_type) for n in _with_node_names(model).graph.node]
    for kind, patterns in (("int8", spec.keep.int8), ("fp16", spec.keep.fp16)):
        for pattern in patterns:
            if any(node_matches((pattern,), name, op) for name, op in nodes):
                continue
            candidates = sorted({name for name, _ in nodes if name} | {op for _, op in nodes})
            close = difflib.get_close_matches(
                pattern.removeprefix("re:"), candidates, n=5, cutoff=0.4
            )
            hint = "Patterns are exact node names, op types, or re:<regex> over node names."
            if close:
                hint = f"Close node names or op types: {', '.join(close)}. {hint}"
            raise SpecError(
                f"Keep pattern {pattern!r} ({kind}) matches no node of the model.",
                hint=hint,
                field="keep",
            )


def _with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Unnamed nodes get the names the graph passes (and their reports) give them."""
    if all(node.name for node in model.graph.node):
        return model
    from engines.graph.inspect import normalize

    return normalize(model)


def _fmt_shape(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _example(shape: tuple[int | str | None, ...]) -> str:
    dims = [str(d) if isinstance(d, int) and d > 0 else "N" for d in shape]
    one = "x".join(dims)
    return f"{one}/{one}/{one}"
