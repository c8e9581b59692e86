"""Which nodes may compute in FP16, and which tensors of theirs change type.

A node's float32 inputs and outputs are bound to type parameters of its ONNX schema (``T`` of
``Add``, ``T1`` of ``Resize``'s ``X``...). A slot is *convertible* when its tensor is float32 and
its parameter also allows ``tensor(float16)``; slots of literal types (``Resize``'s
``scales: tensor(float)``) never change. A node computes in FP16 when its convertible slots are
switched together, and stays in FP32 (with Casts around it) when:

- the user keeps it (``keep`` patterns);
- it is a Q/DQ node (their scales stay float32), a custom-domain or control-flow op, or an op
  whose output type is set by an attribute (other than Cast / ConstantOfShape, which are retyped);
- one of its tensors leaves the FP16 range: calibrated amax > 65504, or initializer values beyond
  it, or a scalar constant that would underflow to 0;
- it may overflow FP16 internally: ``x**p`` (Pow, p > 1), ReduceSumSquare, ReduceL2,
  ReduceLogSumExp, Exp, and LayerNormalization whose calibrated input makes the variance overflow
  (amax**2 > 65504). Without a calibrated range the power/reduction ops stay FP32, and so does
  the chain reading their (possibly huge) outputs up to the next Sqrt/Div/... (the variance
  branch of a hand-written LayerNorm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from engines.graph._onnx import GraphIndex, subgraph_references
from engines.spec import node_matches

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable

__all__ = ["FP16_MAX", "NodeDecision", "classify"]

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
_FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)  # ~5.96e-8
_FP16 = "tensor(float16)"

_ATTRIBUTE_TYPED = frozenset(
    {
        "EyeLike",
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Constant",
    }
)
_GROWING = frozenset({"ReduceMean", "ReduceSum", "Add", "Sub", "Mul", "Neg", "Abs", "Max", "Min"})


@dataclass
class NodeDecision:
    """The precision of one node: which of its slots switch to FP16, or why it stays FP32."""

    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    fp16: bool = False
    reason: str = ""
    neutral: bool = False
    """No float output: follows its inputs' precision, not reported when it stays FP32."""


def _param_allows(schema: onnx.defs.OpSchema, formal: str) -> bool:
    for constraint in schema.type_constraints:
        if constraint.type_param_str == formal:
            return _FP16 in constraint.allowed_type_strs
    return formal == _FP16


def _formal(params: list[onnx.defs.OpSchema.FormalParameter], i: int) -> str | None:
    if i < len(params):
        return str(params[i].type_str)
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    if params and params[-1].option == variadic:
        return str(params[-1].type_str)
    return None


class _Classifier:
    def __init__(
        self, index: GraphIndex, table: CalibrationTable | None, keep: tuple[str, ...]
    ) -> None:
        self.index = index
        self.table = table
        self.keep = keep
        model = index.model
        self.opsets = {(e.domain or ""): int(e.version) for e in model.opset_import}
        self.opsets.setdefault("", self.opsets.get("ai.onnx", 0))
        self.subgraph_names = subgraph_references(model.graph)
        self.large: set[str] = set()
        self._peaks: dict[str, float | None] = {}

    # -- tensor ranges -------------------------------------------------------------------------

    def peak(self, tensor: str) -> float | None:
        """Largest magnitude ``tensor`` reaches: calibrated amax, or initializer values."""
        if self.table is not None and tensor in self.table.amax:
            return float(self.table.amax[tensor])
        if tensor not in self._peaks:
            values = self.index.array(tensor)
            if values is None or values.size == 0:
                self._peaks[tensor] = None
            elif not np.all(np.isfinite(values)):
                self._peaks[tensor] = math.inf
            else:
                self._peaks[tensor] = float(np.abs(values.astype(np.float64)).max())
        return self._peaks[tensor]

    def _range_problem(self, node: onnx.NodeProto, slots: list[str]) -> str | None:
        for tensor in slots:
            peak = self.peak(tensor)
            if peak is not None and peak > FP16_MAX:
                return f"range: {tensor!r} reaches {peak:.4g} (> {FP16_MAX:.0f})"
            values = self.index.array(tensor)
            if values is not None and values.size == 1:
                magnitude = float(np.abs(values.astype(np.float64)).max())
                if 0 < magnitude < _FP16_TINY:
                    return f"range: constant {tensor!r} = {magnitude:.3g} underflows to 0 in FP16"
        return None

    # -- slots -------------------------------------------------------------------------------

    def slots(self, node: onnx.NodeProto) -> NodeDecision | str | None:
        """Convertible slots, a reason the node cannot be FP16, or None for non-float nodes."""
        index = self.index
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), 0)
            return NodeDecision(outputs=[0]) if to == TensorProto.FLOAT else None
        if node.op_type == "ConstantOfShape":
            return NodeDecision(outputs=[0]) if index.is_float32(node.output[0]) else None
        floats = [t for t in (*node.input, *node.output) if t and index.is_float32(t)]
        if not floats:
            return None
        if node.domain not in ("", "ai.onnx"):
            return f"custom op domain {node.domain!r}"
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            return "control flow (subgraphs stay FP32)"
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return "Q/DQ keeps float32 scales (Casts at its FP16 neighbours)"
        if node.op_type in _ATTRIBUTE_TYPED:
            return "output type is set by an attribute"
        if node.op_type == "Range":
            return "Range's length depends on exact arithmetic"
        try:
            schema = onnx.defs.get_schema(
                node.op_type, max_inclusive_version=self.opsets.get(node.domain, 0), domain=""
            )
        except onnx.defs.SchemaError:
            return f"no ONNX schema for {node.op_type}"
        return self._schema_slots(node, schema)

    def _schema_slots(self, node: onnx.NodeProto, schema: onnx.defs.OpSchema) -> NodeDecision | str:
        index = self.index
        decision = NodeDecision()
        blocked: set[str] = set()
        for kind, names, params, chosen in (
            ("input", node.input, schema.inputs, decision.inputs),
            ("output", node.output, schema.outputs, decision.outputs),
        ):
            for i, tensor in enumerate(names):
                formal = _formal(list(params), i)
                if not tensor or formal is None:
                    continue
                elem = index.elem_type.get(tensor)
                if elem == TensorProto.FLOAT and _param_allows(schema, formal):
                    chosen.append(i)
                elif (
                    elem is None
                    and _param_allows(schema, formal)
                    and not formal.startswith("tensor(")
                ):
                    blocked.add(f"{kind} {tensor!r} has an unknown type")
        if blocked:
            return "; ".join(sorted(blocked))
        if not decision.inputs and not decision.outputs:
            return "no FP16 kernel in the ONNX schema for its float tensors"
        decision.neutral = not decision.outputs
        return decision

    # -- overflow rules ----------------------------------------------------------------------

    def overflow(self, node: onnx.NodeProto) -> str | None:
        """Why ``node`` may overflow FP16 internally, or None."""
        op = node.op_type
        first = node.input[0] if node.input else ""
        if op == "Pow" and len(node.input) == 2:
            exponent = self.index.array(node.input[1])
            if exponent is None or exponent.size != 1:
                return self._power_bound(first, 2.0)  # unknown exponent: assume squares
            power = float(exponent.reshape(-1)[0])
            return self._power_bound(first, power) if power > 1 else None
        if op == "ReduceL2":
            return self._power_bound_from_output(node.output[0], 2.0)
        if op in ("ReduceSumSquare", "Exp") and self.peak(node.output[0]) is None:
            return f"{op} may overflow FP16 and has no calibrated range"
        if op == "ReduceLogSumExp":
            peak = self.peak(first)
            if peak is None or peak > math.log(FP16_MAX):
                return f"ReduceLogSumExp may overflow FP16 ({first!r} reaches {peak})"
        if op == "LayerNormalization":
            peak = self.peak(first)
            if peak is not None and peak * peak > FP16_MAX:
                return f"LayerNormalization input reaches {peak:.4g}: its variance overflows FP16"
        return None

    def _power_bound(self, tensor: str, power: float) -> str | None:
        peak = self.peak(tensor)
        if peak is None:
            return f"x**{power:g} may overflow FP16 and {tensor!r} has no calibrated range"
        if peak > 1 and power * math.log(peak) > math.log(FP16_MAX):
            return f"x**{power:g} overflows FP16 ({tensor!r} reaches {peak:.4g})"
        return None

    def _power_bound_from_output(self, tensor: str, power: float) -> str | None:
        peak = self.peak(tensor)
        if peak is None:
            return f"the sum of squares may overflow FP16 and {tensor!r} has no calibrated range"
        if peak**power > FP16_MAX:
            return f"the sum of squares overflows FP16 ({tensor!r} reaches {peak:.4g})"
        return None

    def _large_input(self, node: onnx.NodeProto) -> str | None:
        for tensor in node.input:
            if tensor in self.large and self.peak(tensor) is None:
                return f"reads {tensor!r}, which may exceed the FP16 range"
        return None

    # -- driver ------------------------------------------------------------------------------

    def decide(self, node: onnx.NodeProto) -> NodeDecision | None:
        found = self.slots(node)
        if found is None:
            return None
        if isinstance(found, str):
            return NodeDecision(reason=found)
        if node_matches(self.keep, node.name, node.op_type):
            return NodeDecision(reason="kept by user")
        if any(o in self.subgraph_names for o in node.output):
            return NodeDecision(reason="its output is read inside a subgraph")
        tensors = [node.input[i] for i in found.inputs] + [node.output[i] for i in found.outputs]
        reason = self._range_problem(node, tensors)
        if reason is None:
            reason = self.overflow(node)
            if reason is not None:
                self.large.update(o for o in node.output if o)
        if reason is None:
            reason = self._large_input(node)
            if reason is not None and node.op_type in _GROWING:
                self.large.update(o for o in node.output if o)
        if reason is not None:
            return NodeDecision(reason=reason)
        found.fp16 = True
        return found


def classify(
    index: GraphIndex, table: CalibrationTable | None, keep: tuple[str, ...]
) -> dict[int, NodeDecision]:
    """Node index -> decision, for every node that touches float32 tensors."""
    classifier = _Classifier(index, table, keep)
    decisions: dict[int, NodeDecision] = {}
    for i, node in enumerate(index.nodes):
        decision = classifier.decide(node)
        if decision is not None:
            decisions[i] = decision
    return decisions
