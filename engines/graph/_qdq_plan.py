"""Where Q/DQ pairs go: TensorRT's explicit-quantization placement, decided node by node.

TensorRT fuses a DequantizeLinear into the op that consumes it and a QuantizeLinear into the op
that produces its input, so Q/DQ belong on the *inputs* of the ops that have INT8 kernels:

- Conv, ConvTranspose, Gemm, MatMul: the activation input per tensor (scale from the table) and
  the constant weight per output channel; never their outputs. A Conv reading a zero Pad gets
  its pair above the Pad, which TensorRT then fuses into the Conv.
- A residual Add: only the skip input, the one not coming from the Conv TensorRT fuses the Add
  into (a Conv output read by nothing else). An Add with no such Conv gets nothing.
- AveragePool / GlobalAveragePool: their input. MaxPool: nothing (Q/DQ commute with it).
- Concat: when its output is quantized, its inputs too, all with one shared scale, so the
  concatenation itself runs in INT8.
- Attention cores (QK^T and attention x V around a Softmax), GEMV-shaped MatMuls, LayerNormalization
  and GELU stay in high precision unless ``quantize_attention`` asks for them.

A tensor read by several quantized ops gets one Q/DQ pair. Nodes matched by a keep pattern get
none. Every decision lands in the report: quantized, or skipped with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from calibrators.weights import WEIGHT_OPS, node_weight_axis
from engines.graph._onnx import GraphIndex
from engines.graph._patterns import attention_cores, gelu_nodes, is_gemv
from engines.spec import node_matches

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable

__all__ = ["QdqKey", "QdqPlan", "plan_qdq", "table_amax", "zero_constant_pad"]

_COMPUTE_OPS = WEIGHT_OPS
_POOL_OPS = frozenset({"AveragePool", "GlobalAveragePool"})
_FUSING_CONVS = frozenset({"Conv", "ConvTranspose"})


@dataclass(frozen=True)
class QdqKey:
    """One Q/DQ pair: the tensor it quantizes and how.

    ``weight`` pairs take their scale from the constant's values (``axis`` = the per-channel
    axis, None = one scale); activation pairs take theirs from the calibration table.
    """

    tensor: str
    weight: bool
    axis: int | None = None


@dataclass
class QdqPlan:
    """Which node inputs read a dequantized tensor, and what the report says."""

    rewires: dict[int, dict[int, QdqKey]] = field(default_factory=dict)
    """Node index -> input slot -> the pair whose DequantizeLinear output it reads."""
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, list[str]] = field(default_factory=dict)
    """Quantized node -> the tensors whose pairs it reads (through a hoisted Pad too)."""
    groups: dict[str, str] = field(default_factory=dict)
    """Tensor -> representative of its shared-scale (Concat) group."""

    @property
    def keys(self) -> list[QdqKey]:
        seen: dict[QdqKey, None] = {}
        for slots in self.rewires.values():
            for key in slots.values():
                seen.setdefault(key, None)
        return list(seen)


def table_amax(table: CalibrationTable, tensor: str) -> float | None:
    """The usable amax of ``tensor``: finite, > 0 and giving a float32 scale > 0; else None."""
    value = table.amax.get(tensor)
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return value if table.scale(tensor) > 0 else None


class _Planner:
    def __init__(
        self,
        index: GraphIndex,
        table: CalibrationTable,
        keep: tuple[str, ...],
        quantize_attention: bool,
    ) -> None:
        self.index = index
        self.table = table
        self.keep = keep
        self.quantize_attention = quantize_attention
        self.plan = QdqPlan()
        self.quantized_idx: set[int] = set()
        self.cores = attention_cores(index)
        self.gelus = gelu_nodes(index)
        self.position = {n.name: i for i, n in enumerate(index.nodes)}

    # -- requests --------------------------------------------------------------------------

    def _request(self, tensor: str, weight_axis: int | None) -> QdqKey | str:
        """The pair quantizing ``tensor``, or why it cannot be quantized."""
        index = self.index
        if not index.is_float32(tensor):
            return f"excluded by rule: input {tensor!r} is not float32"
        producer = index.producer_node(tensor)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return f"excluded by rule: input {tensor!r} is already dequantized (Q/DQ present)"
        values = index.array(tensor)
        if values is not None:
            if not np.all(np.isfinite(values)):
                return f"no range: weight {tensor!r} has non-finite values"
            axis = weight_axis if weight_axis is not None and weight_axis < values.ndim else None
            return QdqKey(tensor, weight=True, axis=axis)
        if table_amax(self.table, tensor) is None:
            return f"no range: tensor {tensor!r} has no usable range in the calibration table"
        return QdqKey(tensor, weight=False)

    def _weight_axis(self, node: onnx.NodeProto, slot: int) -> int | None:
        """The output-channel axis of a weight in ``slot`` (the rule of
        :func:`calibrators.weights.weight_axis`); None for activation slots and per-tensor
        weights."""
        if slot != 1 or node.op_type not in WEIGHT_OPS:
            return None
        return node_weight_axis(node, len(self.index.shape.get(node.input[1], ())))

    def _take(self, i: int, node: onnx.NodeProto, slots: dict[int, QdqKey]) -> None:
        self.plan.rewires.setdefault(i, {}).update(slots)
        self.quantized_idx.add(i)
        tensors = self.plan.tensors.setdefault(node.name, [])
        tensors.extend(k.tensor for _, k in sorted(slots.items()) if k.tensor not in tensors)

    def _requests(self, node: onnx.NodeProto, slots: list[int]) -> dict[int, QdqKey] | str:
        keys: dict[int, QdqKey] = {}
        for slot in slots:
            found = self._request(node.input[slot], self._weight_axis(node, slot))
            if isinstance(found, str):
                return found
            keys[slot] = found
        return keys

    # -- per-op rules ------------------------------------------------------------------------

    def _rule_exclusion(self, node: onnx.NodeProto) -> str | None:
        if self.quantize_attention or node.op_type != "MatMul":
            return None
        if node.name in self.cores:
            return "excluded by rule: attention core (MatMul around Softmax)"
        if is_gemv(self.index, node):
            return "excluded by rule: GEMV-shaped MatMul (M or N is 1)"
        return None

    def _compute_or_pool(self, i: int, node: onnx.NodeProto) -> None:
        reason = self._rule_exclusion(node)
        if reason is None:
            slots = [0] if node.op_type in _POOL_OPS else [0, 1]
            if len(node.input) <= max(slots) or not all(node.input[s] for s in slots):
                reason = "excluded by rule: missing input"
            else:
                found = self._requests(node, slots)
                if isinstance(found, str):
                    reason = found
                else:
                    self._take(i, node, found)
                    self._hoist_above_zero_pad(i, node)
                    return
        self.plan.skipped[node.name] = reason

    def _hoist_above_zero_pad(self, i: int, node: onnx.NodeProto) -> None:
        """Conv(Pad(x, 0)): quantize x instead of the padded tensor.

        Quantization maps 0 to 0, so the graph computes the same values, and TensorRT fuses a
        Pad that sits between the Q/DQ pair and a Conv into the Conv instead of running it as
        a separate layer (NVIDIA/TensorRT#2592).
        """
        index = self.index
        padded = node.input[0]
        j = index.producer.get(padded)
        if node.op_type not in _FUSING_CONVS or j is None:
            return
        pad = index.node(j)
        if pad.op_type != "Pad" or not zero_constant_pad(index, pad):
            return
        if len(index.consumers.get(padded, [])) != 1 or padded in index.graph_outputs:
            return
        found = self._request(pad.input[0], None)
        if isinstance(found, QdqKey) and not found.weight:
            self.plan.rewires[i].pop(0)
            self.plan.rewires.setdefault(j, {})[0] = found
            tensors = self.plan.tensors[node.name]
            tensors[tensors.index(padded)] = found.tensor

    def _layer_norm(self, i: int, node: onnx.NodeProto) -> None:
        if not self.quantize_attention:
            self.plan.skipped[node.name] = (
                "excluded by rule: LayerNormalization stays high precision"
            )
            return
        found = self._requests(node, [0])
        if isinstance(found, str):
            self.plan.skipped[node.name] = found
        else:
            self._take(i, node, found)

    def _gelu(self, i: int, node: onnx.NodeProto) -> None:
        x, readers = self.gelus[node.name]
        if not self.quantize_attention:
            self.plan.skipped[node.name] = "excluded by rule: GELU stays high precision"
            return
        found = self._request(x, None)
        if isinstance(found, str):
            self.plan.skipped[node.name] = found
            return
        for reader in readers:
            j = self.position[reader]
            slots = {s: found for s, name in enumerate(self.index.node(j).input) if name == x}
            self.plan.rewires.setdefault(j, {}).update(slots)
        self.quantized_idx.add(i)
        self.plan.tensors[node.name] = [x]

    def _residual_add(self, i: int, node: onnx.NodeProto) -> None:
        index = self.index
        if len(node.input) != 2 or node.input[0] == node.input[1]:
            return
        if any(index.is_constant(t) or not index.is_float32(t) for t in node.input):
            return  # a bias or integer Add, not a residual connection
        fusable = [s for s, t in enumerate(node.input) if self._fusable_conv(t)]
        if not fusable:
            self.plan.skipped[node.name] = (
                "excluded by rule: residual Add with no quantized Conv to fuse into"
            )
            return
        # Fuse the Conv computed last (the residual branch); quantize the other (skip) input.
        fused = max(fusable, key=lambda s: index.producer[node.input[s]])
        skip_slot = 1 - fused
        found = self._request(node.input[skip_slot], None)
        if isinstance(found, str):
            self.plan.skipped[node.name] = found
        else:
            self._take(i, node, {skip_slot: found})

    def _fusable_conv(self, tensor: str) -> bool:
        index = self.index
        j = index.producer.get(tensor)
        if j is None or j not in self.quantized_idx:
            return False
        if index.node(j).op_type not in _FUSING_CONVS or tensor in index.graph_outputs:
            return False
        return len(index.consumers.get(tensor, [])) == 1

    def _concat(self, i: int, node: onnx.NodeProto, requested: set[str]) -> None:
        index = self.index
        out = node.output[0]
        if not index.is_float32(out):
            return
        if out not in requested:
            self.plan.skipped[node.name] = "excluded by rule: its output feeds no quantized op"
            return
        keys: dict[int, QdqKey] = {}
        members = [out]
        for slot, tensor in enumerate(node.input):
            if not tensor:
                continue
            found = self._request_member(tensor)
            if isinstance(found, str):
                self.plan.skipped[node.name] = found
                return
            keys[slot] = found
            members.append(tensor)
        self._take(i, node, keys)
        requested.update(members)
        self._union(members)

    def _request_member(self, tensor: str) -> QdqKey | str:
        """A Concat input: quantized with the group's shared scale, even without its own range."""
        index = self.index
        producer = index.producer_node(tensor)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return f"excluded by rule: input {tensor!r} is already dequantized (Q/DQ present)"
        return QdqKey(tensor, weight=False)

    def _union(self, members: list[str]) -> None:
        groups = self.plan.groups
        roots = {self._root(m) for m in members}
        root = min(roots)
        for m in members:
            groups[m] = root
        for r in roots:
            groups[r] = root
        for tensor, parent in list(groups.items()):
            if parent in roots:
                groups[tensor] = root

    def _root(self, tensor: str) -> str:
        while self.plan.groups.get(tensor, tensor) != tensor:
            tensor = self.plan.groups[tensor]
        return tensor

    # -- driver ------------------------------------------------------------------------------

    def _node(self, i: int, node: onnx.NodeProto) -> None:
        """Rules that need no knowledge of other nodes' decisions."""
        if node.op_type in _COMPUTE_OPS or node.op_type in _POOL_OPS:
            self._compute_or_pool(i, node)
        elif node.op_type == "LayerNormalization":
            self._layer_norm(i, node)
        elif node.name in self.gelus:
            self._gelu(i, node)
        elif node.op_type == "MaxPool":
            self.plan.skipped[node.name] = (
                "excluded by rule: MaxPool is not quantized (Q/DQ move across it)"
            )

    def run(self) -> QdqPlan:
        nodes = self.index.nodes
        kept: set[int] = set()
        for i, node in enumerate(nodes):
            if node_matches(self.keep, node.name, node.op_type) and _is_candidate(node, self):
                self.plan.skipped[node.name] = "kept by user"
                kept.add(i)
        for i, node in enumerate(nodes):
            if i not in kept:
                self._node(i, node)
        for i, node in enumerate(nodes):
            if i not in kept and node.op_type == "Add":
                self._residual_add(i, node)
        requested = {key.tensor for key in self.plan.keys if not key.weight}
        for i in reversed(range(len(nodes))):
            if i not in kept and nodes[i].op_type == "Concat":
                self._concat(i, nodes[i], requested)
        self.plan.quantized = [nodes[i].name for i in sorted(self.quantized_idx)]
        return self.plan


def zero_constant_pad(index: GraphIndex, pad: onnx.NodeProto) -> bool:
    """A Pad in constant mode filling with 0 (the default), the only Pad Q/DQ commute with."""
    mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
    if mode != b"constant":
        return False
    if len(pad.input) > 2 and pad.input[2]:
        value = index.array(pad.input[2])
        return value is not None and not np.any(value)
    value_attr = next((a.f for a in pad.attribute if a.name == "value"), 0.0)  # opset < 11
    return value_attr == 0.0


def _is_candidate(node: onnx.NodeProto, planner: _Planner) -> bool:
    """Whether a keep pattern matching ``node`` keeps something out of INT8 (worth reporting)."""
    op = node.op_type
    index = planner.index
    if op == "Add":
        return len(node.input) == 2 and all(
            not index.is_constant(t) and index.is_float32(t) for t in node.input
        )
    if op == "Concat":
        return bool(node.output) and index.is_float32(node.output[0])
    return (
        op in _COMPUTE_OPS
        or op in _POOL_OPS
        or op in ("LayerNormalization", "MaxPool")
        or node.name in planner.gelus
    )


def plan_qdq(
    index: GraphIndex,
    table: CalibrationTable,
    *,
    keep: tuple[str, ...],
    quantize_attention: bool,
) -> QdqPlan:
    """Decide the Q/DQ placement for the (normalized) model behind ``index``."""
    return _Planner(index, table, keep, quantize_attention).run()
