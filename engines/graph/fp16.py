"""FP16 conversion in the manner of ModelOpt's AutoCast: FP32 compute becomes FP16 where it is safe.

Graph inputs and outputs keep their types; Casts are inserted where an FP16 region meets FP32
(one Cast per tensor and direction, shared by all readers). Initializers read only by FP16 nodes
are stored as FP16; one read by both kinds gets an FP16 copy. Which nodes stay FP32, and why, is
decided in :mod:`engines.graph._fp16_rules` and listed in the report. Q/DQ nodes keep their
float32 scales: a DequantizeLinear feeding an FP16 op is followed by a Cast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import BaseModel, ConfigDict

from engines.graph._fp16_rules import NodeDecision, classify
from engines.graph._onnx import (
    GraphIndex,
    NameAllocator,
    check_model,
    infer_shapes,
    subgraph_references,
)
from engines.graph.inspect import normalize

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable

__all__ = ["Fp16Report", "convert_fp16"]


class Fp16Report(BaseModel):
    """What the FP16 pass did: nodes now computing in FP16, and nodes kept FP32 with the reason."""

    model_config = ConfigDict(frozen=True)

    fp16_nodes: list[str]
    """Nodes whose float tensors are now FP16, in graph order."""
    fp32_nodes: dict[str, str]
    """Node -> why it stays FP32 (``kept by user``, ``range: ...``, an op rule)."""
    casts_inserted: int = 0


def convert_fp16(
    model: onnx.ModelProto,
    *,
    table: CalibrationTable | None = None,
    keep: tuple[str, ...] = (),
) -> tuple[onnx.ModelProto, Fp16Report]:
    """Convert a copy of ``model`` to mixed FP16/FP32.

    ``table``: calibrated ranges; a node touching a tensor whose amax exceeds 65504 stays FP32
    (without a table only initializer values are known). ``keep``: node names, op types or
    ``re:<regex>`` patterns kept FP32. The result keeps the graph's input/output types and
    passes ``onnx.checker.check_model(full_check=True)``; otherwise :class:`GraphError`.
    """
    work = normalize(model)
    index = GraphIndex.build(work)
    decisions = classify(index, table, keep)
    _settle_neutral(index, decisions)
    names = [node.name for node in index.nodes]  # before the rewrite inserts Casts
    casts = _Rewriter(work, index, decisions).run()
    work = infer_shapes(work)
    check_model(work, "FP16", original=model)
    report = Fp16Report(
        fp16_nodes=[names[i] for i, d in sorted(decisions.items()) if d.fp16],
        fp32_nodes={
            names[i]: d.reason for i, d in sorted(decisions.items()) if not d.fp16 and not d.neutral
        },
        casts_inserted=casts,
    )
    return work, report


def _convertible_initializer(index: GraphIndex, tensor: str) -> bool:
    """An initializer that is not also a graph input (which callers may override)."""
    return tensor in index.initializers and tensor not in index.declared_inputs


def _settle_neutral(index: GraphIndex, decisions: dict[int, NodeDecision]) -> None:
    """Nodes without float outputs (Shape, Equal, ...) go FP16 only when that needs no Cast."""
    fp16_tensors: set[str] = set()
    for i in sorted(decisions):
        decision = decisions[i]
        node = index.node(i)
        if decision.fp16 and decision.neutral:
            decision.fp16 = all(
                node.input[s] in fp16_tensors or _convertible_initializer(index, node.input[s])
                for s in decision.inputs
            )
            if not decision.fp16:
                decision.reason = "reads FP32 tensors and has no float output"
        if decision.fp16:
            fp16_tensors.update(node.output[s] for s in decision.outputs)


class _Rewriter:
    """Retypes FP16 nodes in place and wires Casts between precisions."""

    def __init__(
        self, model: onnx.ModelProto, index: GraphIndex, decisions: dict[int, NodeDecision]
    ) -> None:
        self.model = model
        self.index = index
        self.decisions = decisions
        self.names = NameAllocator(model)
        self.stored16: set[str] = set()
        self.fp16_name: dict[str, str] = {}
        self.fp32_name: dict[str, str] = {}
        self.casts = 0
        self.out: list[onnx.NodeProto] = []
        self.new_initializers: list[TensorProto] = []
        fp16_reads: dict[str, int] = {}
        for i, decision in decisions.items():
            if decision.fp16:
                node = index.node(i)
                self.stored16.update(node.output[s] for s in decision.outputs)
                for s in decision.inputs:
                    fp16_reads[node.input[s]] = fp16_reads.get(node.input[s], 0) + 1
        inner = subgraph_references(model.graph)
        self.fp16_only = {
            name
            for name, count in fp16_reads.items()
            if name in index.initializers
            and count == len(index.consumers.get(name, []))
            and name not in inner
            and name not in index.graph_outputs
        }

    def run(self) -> int:
        graph = self.model.graph
        for i, node in enumerate(graph.node):
            decision = self.decisions.get(i)
            if decision is not None and decision.fp16:
                self._fp16_node(node, decision)
            else:
                self._fp32_node(node)
        del graph.node[:]
        graph.node.extend(self.out)
        replaced = {t.name for t in self.new_initializers}
        kept = [t for t in graph.initializer if t.name not in replaced]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.initializer.extend(self.new_initializers)
        self._retype_value_info()
        self._drop_unused_initializers()
        return self.casts

    # -- nodes ---------------------------------------------------------------------------------

    def _fp16_node(self, node: onnx.NodeProto, decision: NodeDecision) -> None:
        for s in decision.inputs:
            node.input[s] = self._as_fp16(node.input[s])
        self._fp32_inputs(node, skip=set(decision.inputs))
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    attr.i = TensorProto.FLOAT16
        elif node.op_type == "ConstantOfShape":
            _retype_fill_value(node)
        self.out.append(node)
        for s in decision.outputs:
            tensor = node.output[s]
            if tensor in self.index.graph_outputs:
                # Graph outputs keep their name and FP32 type: compute into a new FP16 tensor and
                # cast back to the original name.
                inner = self.names.fresh(f"{tensor}_fp16")
                node.output[s] = inner
                self.fp16_name[tensor] = inner
                self.fp32_name[tensor] = tensor
                self._cast(inner, tensor, TensorProto.FLOAT)
            else:
                self.fp16_name[tensor] = tensor

    def _fp32_node(self, node: onnx.NodeProto) -> None:
        self._fp32_inputs(node, skip=set())
        self.out.append(node)

    def _fp32_inputs(self, node: onnx.NodeProto, skip: set[int]) -> None:
        if node.op_type == "Cast":
            return  # Cast reads any type: an FP16 input is fine
        for s, tensor in enumerate(node.input):
            if s not in skip and tensor in self.stored16:
                node.input[s] = self._as_fp32(tensor)

    # -- tensors -------------------------------------------------------------------------------

    def _as_fp16(self, tensor: str) -> str:
        if tensor in self.fp16_name:
            return self.fp16_name[tensor]
        if _convertible_initializer(self.index, tensor):
            values = self.index.array(tensor)
            assert values is not None
            # Read only through FP16 slots: retype it in place (the weight keeps its name).
            name = tensor if tensor in self.fp16_only else self.names.fresh(f"{tensor}_fp16")
            self.new_initializers.append(numpy_helper.from_array(values.astype(np.float16), name))
        else:
            name = self.names.fresh(f"{tensor}_fp16")
            self._cast(tensor, name, TensorProto.FLOAT16)
        self.fp16_name[tensor] = name
        return name

    def _as_fp32(self, tensor: str) -> str:
        if tensor not in self.fp32_name:
            name = self.names.fresh(f"{tensor}_fp32")
            self._cast(self.fp16_name[tensor], name, TensorProto.FLOAT)
            self.fp32_name[tensor] = name
        return self.fp32_name[tensor]

    def _cast(self, source: str, target: str, to: int) -> None:
        suffix = "to_fp16" if to == TensorProto.FLOAT16 else "to_fp32"
        self.out.append(
            helper.make_node(
                "Cast", [source], [target], name=self.names.fresh(f"{source}_{suffix}"), to=to
            )
        )
        self.casts += 1

    # -- bookkeeping ---------------------------------------------------------------------------

    def _retype_value_info(self) -> None:
        for vi in self.model.graph.value_info:
            in_place = vi.name in self.stored16 or vi.name in self.fp16_only
            if in_place and self.fp16_name.get(vi.name) == vi.name:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT16

    def _drop_unused_initializers(self) -> None:
        graph = self.model.graph
        used = {t for n in graph.node for t in n.input}
        used |= {o.name for o in graph.output} | self.index.declared_inputs
        used |= subgraph_references(graph)
        keep = [t for t in graph.initializer if t.name in used]
        if len(keep) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(keep)


def _retype_fill_value(node: onnx.NodeProto) -> None:
    """ConstantOfShape: its fill value's type is its output type."""
    for attr in node.attribute:
        if attr.name == "value":
            value = numpy_helper.to_array(attr.t).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))
            return
    node.attribute.append(
        helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16)))
    )
