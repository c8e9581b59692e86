"""Small ONNX graph helpers shared by the graph passes: indexes, constants, names, checks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from core.errors import ModelError
from engines.errors import GraphError

__all__ = [
    "FLOAT_TYPES",
    "GraphIndex",
    "NameAllocator",
    "check_model",
    "default_opset",
    "infer_shapes",
    "set_default_opset",
    "subgraph_references",
]

FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
)

Dim = int | str | None


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) domain the model imports; 0 when it imports none."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def set_default_opset(model: onnx.ModelProto, version: int) -> None:
    """Set (or add) the default-domain opset import to ``version``."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
            return
    model.opset_import.append(onnx.helper.make_opsetid("", version))


def infer_shapes(model: onnx.ModelProto, *, strict: bool = False) -> onnx.ModelProto:
    """ONNX shape inference (with data propagation); errors become :class:`GraphError`."""
    try:
        return onnx.shape_inference.infer_shapes(
            model, check_type=strict, strict_mode=strict, data_prop=True
        )
    except ValueError as exc:
        if "2GB" in str(exc) or "2 GB" in str(exc):
            raise GraphError(
                "The model is larger than 2 GiB, which ONNX shape inference cannot hold in memory.",
                hint="Reduce the model size; graph passes on models over 2 GiB are not supported.",
                field="model",
            ) from exc
        raise GraphError(f"ONNX shape inference failed: {exc}", field="model") from exc
    except Exception as exc:  # onnx raises InferenceError and friends
        raise GraphError(
            f"ONNX shape inference failed: {exc}",
            hint="Check the model with `python -m onnx.checker MODEL.onnx` or re-export it.",
            field="model",
        ) from exc


def check_model(model: onnx.ModelProto, what: str, *, original: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(full_check=True)`` on a pass's output.

    A failure is a :class:`GraphError`, unless the pass's input fails the checker too: then the
    model itself is invalid (:class:`ModelError`).
    """
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, ValueError (> 2 GiB)
        try:
            onnx.checker.check_model(original, full_check=True)
        except Exception as original_exc:
            raise ModelError(
                f"The model does not pass the ONNX checker: {original_exc}",
                hint="Check it with `python -m onnx.checker MODEL.onnx` and re-export it.",
                field="model",
            ) from exc
        raise GraphError(
            f"The {what} pass produced an invalid ONNX model: {exc}",
            hint="This is a trtforge bug; please report it with the model, or keep the failing "
            "nodes out of this precision with --keep.",
            field="model",
        ) from exc


def subgraph_references(graph: onnx.GraphProto) -> set[str]:
    """Names used inside the subgraphs (If/Loop/Scan bodies) of ``graph``'s nodes, recursively."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            bodies = list(attr.graphs)
            if attr.HasField("g"):
                bodies.append(attr.g)
            for body in bodies:
                for inner in body.node:
                    names.update(i for i in inner.input if i)
                names.update(o.name for o in body.output)
                names |= subgraph_references(body)
    return names


@dataclass
class GraphIndex:
    """Producers, consumers, constants and types of one (top-level) graph, built once."""

    model: onnx.ModelProto
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    initializers: dict[str, TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)
    declared_inputs: set[str] = field(default_factory=set)
    """Every name in ``graph.input``, initializers listed there (overridable) included."""
    elem_type: dict[str, int] = field(default_factory=dict)
    shape: dict[str, tuple[Dim, ...]] = field(default_factory=dict)
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        graph = model.graph
        index = cls(model=model)
        index.initializers = {t.name: t for t in graph.initializer}
        for name, tensor in index.initializers.items():
            index.elem_type[name] = tensor.data_type
            index.shape[name] = tuple(int(d) for d in tensor.dims)
        for vi in (*graph.input, *graph.output, *graph.value_info):
            tt = vi.type.tensor_type
            if vi.type.HasField("tensor_type") and tt.elem_type:
                index.elem_type.setdefault(vi.name, tt.elem_type)
                if tt.HasField("shape"):
                    index.shape.setdefault(vi.name, _dims(tt.shape))
        index.graph_inputs = {i.name for i in graph.input if i.name not in index.initializers}
        index.graph_outputs = {o.name for o in graph.output}
        index.declared_inputs = {i.name for i in graph.input}
        for i, node in enumerate(graph.node):
            for slot, name in enumerate(node.input):
                if name:
                    index.consumers.setdefault(name, []).append((i, slot))
            for name in node.output:
                if name:
                    index.producer[name] = i
        return index

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    def node(self, i: int) -> onnx.NodeProto:
        node: onnx.NodeProto = self.model.graph.node[i]
        return node

    def producer_node(self, name: str) -> onnx.NodeProto | None:
        i = self.producer.get(name)
        return None if i is None else self.model.graph.node[i]

    def consumer_nodes(self, name: str) -> list[onnx.NodeProto]:
        return [self.model.graph.node[i] for i, _ in self.consumers.get(name, [])]

    def is_constant(self, name: str) -> bool:
        return name in self.initializers

    def array(self, name: str) -> np.ndarray | None:
        """The value of initializer ``name`` (cached), or None for non-constants."""
        if name not in self.initializers:
            return None
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.initializers[name])
        return self._arrays[name]

    def is_float32(self, name: str) -> bool:
        return self.elem_type.get(name) == TensorProto.FLOAT

    def rows(self, name: str) -> Dim:
        """The second-to-last dim of ``name`` (M of a matrix product), 1 for a vector."""
        dims = self.shape.get(name)
        if dims is None:
            return None
        if len(dims) == 1:
            return 1
        return dims[-2] if len(dims) >= 2 else None


def _dims(shape: onnx.TensorShapeProto) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


class NameAllocator:
    """Hands out tensor/node names not yet used in a graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        used: set[str] = set()
        used.update(t.name for t in graph.initializer)
        used.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
        for node in graph.node:
            used.add(node.name)
            used.update(node.input)
            used.update(node.output)
        used |= subgraph_references(graph)
        self._used = used

    def reserve(self, names: Iterable[str]) -> None:
        self._used.update(names)

    def fresh(self, base: str) -> str:
        name = base
        n = 1
        while name in self._used:
            name = f"{base}_{n}"
            n += 1
        self._used.add(name)
        return name
