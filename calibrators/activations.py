"""What a calibration run observes in a model: its float activations, their aliases and sizes.

A float activation is a float graph input or a float node output that depends on a graph input
(the rest are constants). A tensor whose values are exactly another's, rearranged (the output of
Reshape, Flatten, Squeeze, Unsqueeze, Transpose or Identity), has the same histogram and range as
its source: it is an *alias* of that source, neither exposed nor observed. A BERT encoder has about
a fifth of its activations of that kind (the attention heads' reshapes and transposes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from core.errors import ModelError
from core.onnxio import with_graph

__all__ = ["ALIAS_OPS", "ActivationPlan", "observable_tensors"]

log = logging.getLogger(__name__)

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_ELEMENT_BYTES: dict[int, int] = {
    TensorProto.FLOAT: 4,
    TensorProto.FLOAT16: 2,
    TensorProto.DOUBLE: 8,
    TensorProto.BFLOAT16: 2,
}
_SHAPE_ONLY_ELEMENTS = 1024
"""Initializers above this many float elements are only their shapes for shape inference."""


ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity"})
"""Ops whose first output holds exactly the values of their first input, rearranged."""


@dataclass(frozen=True)
class ActivationPlan:
    """Which tensors a calibration run covers, and how many bytes one sample of them takes."""

    tensors: tuple[str, ...]
    """Every float activation, in graph order (what a table lists)."""
    bytes_per_sample: int | None
    """Sum over observed tensors of their per-sample size, when shape inference knows it."""
    aliases: Mapping[str, str] = field(default_factory=dict)
    """Tensor -> the tensor whose values it holds rearranged (see the module docstring)."""
    tensor_bytes: Mapping[str, int | None] = field(default_factory=dict)
    """Tensor -> bytes of one sample of it, None where shape inference cannot tell."""

    @property
    def observed(self) -> tuple[str, ...]:
        """The tensors whose values are collected: all but the aliases."""
        return tuple(name for name in self.tensors if name not in self.aliases)


def _dependent_tensors(model: onnx.ModelProto) -> set[str]:
    """Tensors computed (directly or not) from a graph input; the rest are constants."""
    initializers = {t.name for t in model.graph.initializer}
    live = {i.name for i in model.graph.input if i.name not in initializers}
    for node in model.graph.node:  # nodes are topologically sorted in a valid model
        if any(name in live for name in node.input if name):
            live.update(o for o in node.output if o)
    return live


def observable_tensors(
    model: onnx.ModelProto, sample_shapes: Mapping[str, Sequence[int]] | None = None
) -> ActivationPlan:
    """Float activations of ``model``: float graph inputs and float node outputs fed by an input.

    Types come from ONNX shape inference; tensors whose type it cannot infer are skipped (logged).
    ``sample_shapes`` (input -> the shape of one sample, without the batch axis, as a dataset
    holds them) makes the inference concrete, so the per-sample sizes of models with dynamic
    spatial axes are known too.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _shape_model(model, sample_shapes), strict_mode=False, data_prop=True
        )
    except Exception as exc:  # inference errors are ModelErrors, not crashes
        raise ModelError(f"ONNX shape inference failed: {exc}", field="model") from exc
    infos = {
        vi.name: vi
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    live = _dependent_tensors(model)
    order: list[str] = []
    for vi in model.graph.input:
        if vi.name in live:
            order.append(vi.name)
    for node in model.graph.node:
        order.extend(o for o in node.output if o in live)
    chosen: list[str] = []
    sizes: dict[str, int | None] = {}
    unknown = 0
    for name in order:
        vi = infos.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            unknown += 1
            continue
        ttype = vi.type.tensor_type
        if ttype.elem_type not in _FLOAT_TYPES:
            continue
        chosen.append(name)
        sizes[name] = _sample_bytes(ttype, batch_fixed=sample_shapes is not None)
    if unknown:
        log.info("skipping %d tensors whose type shape inference could not tell", unknown)
    tensors = tuple(dict.fromkeys(chosen))
    aliases = _aliases(model, set(tensors))
    observed = [sizes[name] for name in tensors if name not in aliases]
    total = None if any(size is None for size in observed) else sum(s or 0 for s in observed)
    return ActivationPlan(
        tensors=tensors,
        bytes_per_sample=total,
        aliases=aliases,
        tensor_bytes={name: sizes[name] for name in tensors},
    )


def _shape_model(
    model: onnx.ModelProto, sample_shapes: Mapping[str, Sequence[int]] | None
) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference: large float initializers become typed graph inputs
    (inference needs their shapes, not their values; a 1 GB model is not copied), and with
    ``sample_shapes`` the graph inputs take a batch of 1 of those shapes."""
    graph = model.graph
    fed = {name for name in (sample_shapes or {})}
    inputs: list[onnx.ValueInfoProto] = []
    for vi in graph.input:
        if vi.name in fed and sample_shapes is not None:
            vi = onnx.helper.make_tensor_value_info(
                vi.name, vi.type.tensor_type.elem_type, [1, *sample_shapes[vi.name]]
            )
        inputs.append(vi)
    declared = {vi.name for vi in graph.input}
    initializers: list[onnx.TensorProto] = []
    for tensor in graph.initializer:
        size = int(np.prod(tensor.dims)) if tensor.dims else 1
        if tensor.data_type in _FLOAT_TYPES and size > _SHAPE_ONLY_ELEMENTS:
            if tensor.name not in declared:
                inputs.append(
                    onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                )
        else:
            initializers.append(tensor)
    return with_graph(
        model, node=graph.node, input=inputs, output=graph.output, initializer=initializers
    )


def _aliases(model: onnx.ModelProto, tensors: set[str]) -> dict[str, str]:
    """Outputs of :data:`ALIAS_OPS` -> the root tensor whose values they rearrange."""
    aliases: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ALIAS_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if not node.input or not node.output or node.output[0] not in tensors:
            continue
        source = node.input[0]
        if source in tensors and source != node.output[0]:
            aliases[node.output[0]] = aliases.get(source, source)
    return aliases


def _sample_bytes(ttype: onnx.TypeProto.Tensor, *, batch_fixed: bool) -> int | None:
    """Bytes of one sample: the whole tensor at batch 1 when the inputs were fixed to it, else
    every axis but the first (the batch); None when an axis is unknown."""
    if not ttype.HasField("shape"):
        return None
    dims = list(ttype.shape.dim)
    if not batch_fixed:
        dims = dims[1:]
    size = _ELEMENT_BYTES[ttype.elem_type]
    for d in dims:
        if not d.HasField("dim_value"):
            return None
        size *= d.dim_value
    return size
