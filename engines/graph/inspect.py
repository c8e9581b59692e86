"""What a model is made of (inputs, outputs, opset, op census, dynamic dims), safe loading, and the
normalizing step every pass starts from: ``Constant`` nodes folded into initializers, unnamed
nodes named, ONNX shape inference run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel, ConfigDict

from core.onnxio import load_onnx
from engines.graph._onnx import default_opset, infer_shapes

__all__ = ["ModelInfo", "TensorInfo", "inspect_model", "load_model", "normalize"]

Dim = int | str | None


class TensorInfo(BaseModel):
    """A graph input or output: name, numpy dtype name, shape (str = symbolic dim, None = unknown)."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None
    """None when the rank itself is unknown."""

    @property
    def dynamic(self) -> bool:
        return self.shape is None or any(not isinstance(d, int) for d in self.shape)


class ModelInfo(BaseModel):
    """A summary of an ONNX model's interface and contents."""

    model_config = ConfigDict(frozen=True)

    inputs: tuple[TensorInfo, ...]
    """Graph inputs that are not initializers."""
    outputs: tuple[TensorInfo, ...]
    opset: int
    """Version of the default ``ai.onnx`` domain."""
    opset_imports: dict[str, int]
    ir_version: int
    producer: str
    op_census: dict[str, int]
    """Op type -> node count (top-level graph), most frequent first."""
    node_names: tuple[str, ...]
    num_nodes: int
    dynamic_dims: dict[str, list[str]]
    """Input/output name -> its non-fixed dims (symbolic name, or ``?`` when unnamed)."""
    weights_in_constants: bool
    """Whether float tensors (weights) live in ``Constant`` nodes; :func:`normalize` folds them."""
    parameter_count: int
    """Elements in float initializers and float ``Constant`` tensors."""


def _dtype_name(elem_type: int) -> str:
    if elem_type == TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name)
    except Exception:  # UNDEFINED, float8 and int4 types numpy cannot name
        return str(TensorProto.DataType.Name(elem_type)).lower()


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo:
    tt = vi.type.tensor_type
    shape: tuple[Dim, ...] | None = None
    if tt.HasField("shape"):
        dims: list[Dim] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shape = tuple(dims)
    return TensorInfo(name=vi.name, dtype=_dtype_name(tt.elem_type), shape=shape)


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The tensor a ``Constant`` node produces, when it is expressible as an initializer."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    name = node.output[0]
    if attr.name == "value":
        tensor = TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = name
        return tensor
    values: dict[str, np.ndarray] = {}
    if attr.name == "value_float":
        values[name] = np.array(attr.f, dtype=np.float32)
    elif attr.name == "value_floats":
        values[name] = np.array(list(attr.floats), dtype=np.float32)
    elif attr.name == "value_int":
        values[name] = np.array(attr.i, dtype=np.int64)
    elif attr.name == "value_ints":
        values[name] = np.array(list(attr.ints), dtype=np.int64)
    else:  # sparse_value, strings: leave the node alone
        return None
    return numpy_helper.from_array(values[name], name)


def _is_float_weight(tensor: TensorProto) -> bool:
    size = int(np.prod(tensor.dims)) if tensor.dims else 1
    return tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE) and (
        size > 1
    )


def inspect_model(model: onnx.ModelProto) -> ModelInfo:
    """Summarize ``model`` (no copy, no change)."""
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = tuple(_tensor_info(i) for i in graph.input if i.name not in initializer_names)
    outputs = tuple(_tensor_info(o) for o in graph.output)
    dynamic: dict[str, list[str]] = {}
    for info in (*inputs, *outputs):
        if info.shape is None:
            dynamic[info.name] = ["?"]
            continue
        dims = [d if isinstance(d, str) else "?" for d in info.shape if not isinstance(d, int)]
        if dims:
            dynamic[info.name] = dims
    census = Counter(n.op_type for n in graph.node)
    constants = [n.attribute[0].t for n in graph.node if _constant_value_attr(n)]
    params = sum(
        int(np.prod(t.dims)) if t.dims else 1
        for t in (*graph.initializer, *constants)
        if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
    )
    return ModelInfo(
        inputs=inputs,
        outputs=outputs,
        opset=default_opset(model),
        opset_imports={(e.domain or "ai.onnx"): int(e.version) for e in model.opset_import},
        ir_version=int(model.ir_version),
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        op_census=dict(census.most_common()),
        node_names=tuple(n.name for n in graph.node),
        num_nodes=len(graph.node),
        dynamic_dims=dynamic,
        weights_in_constants=any(_is_float_weight(t) for t in constants),
        parameter_count=params,
    )


def _constant_value_attr(node: onnx.NodeProto) -> bool:
    return (
        node.op_type == "Constant"
        and len(node.attribute) == 1
        and node.attribute[0].name == "value"
    )


def load_model(path: Path) -> onnx.ModelProto:
    """Load an ONNX model with its weights: :func:`core.onnxio.load_onnx`, the one safe
    loader (external data only as plain relative paths inside the model's folder), so a model
    accepted at upload is accepted at build and the other way round."""
    return load_onnx(Path(path))


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` ready for the graph passes.

    ``Constant`` nodes of the top-level graph become initializers (unless they are graph outputs),
    unnamed nodes get unique names (``<OpType>_<index>``) so reports and keep patterns can name
    them, and ONNX shape inference fills in ``value_info``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    outputs = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    folded: list[TensorProto] = []
    for node in graph.node:
        tensor = _constant_tensor(node) if node.output and node.output[0] not in outputs else None
        if tensor is None:
            kept.append(node)
        else:
            folded.append(tensor)
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        graph.initializer.extend(folded)
        if out.ir_version < 4:
            # Before IR 4 every initializer must also be a graph input.
            graph.input.extend(
                helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in folded
            )
    used = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{i}"
        while name in used:
            name += "_"
        node.name = name
        used.add(name)
    return infer_shapes(out)
