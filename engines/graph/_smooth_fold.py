"""Where a smoothing's ``1/s`` goes: the walk from an activation back to an op that absorbs it.

See :mod:`engines.graph.smoothing` for the rules. A plan is a list of :class:`Edit`: constants
(weights, biases, normalization parameters, Add/Mul/Div operands) rewritten so that the activation
comes out divided by ``s`` per channel, everything else unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from engines.graph._onnx import GraphIndex
from engines.graph._qdq_plan import zero_constant_pad

__all__ = ["Edit", "fold_plan"]

_COMMUTING = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "MaxPool",
        "GlobalMaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Identity",
        "Dropout",
    }
)
"""Ops ``f`` with ``f(x / s) == f(x) / s`` per channel for ``s > 0`` (on their first input)."""
_SHAPE_READERS = frozenset({"Shape", "Size"})
_MAX_DEPTH = 16


@dataclass(frozen=True)
class Edit:
    """Rewrite input ``slot`` of ``node`` (a constant).

    ``axis`` set: a weight, divided by ``s`` along that axis (a producer's output channels).
    ``axis`` None: a per-channel operand broadcast against the activation with ``trailing``
    dims after the channel, divided by ``s`` (``multiply``: multiplied, for ``Div(x, c)``).
    """

    node: onnx.NodeProto
    slot: int
    axis: int | None = None
    trailing: int = 0
    multiply: bool = False

    def apply(self, values: np.ndarray, scales: np.ndarray) -> np.ndarray:
        s = np.asarray(scales, dtype=np.float64)
        if self.axis is not None:
            shape = [1] * values.ndim
            shape[self.axis] = s.size
            return np.asarray(values / s.reshape(shape), dtype=np.float32)
        padded = _padded_shape(values.shape, self.trailing)
        vector = s.reshape((-1,) + (1,) * self.trailing)
        base = values.reshape(padded)
        out = base * vector if self.multiply else base / vector
        return np.asarray(out, dtype=np.float32)


def _padded_shape(shape: tuple[int, ...], trailing: int) -> tuple[int, ...]:
    rank = max(len(shape), trailing + 1)
    return (1,) * (rank - len(shape)) + tuple(shape)


def _vector_fits(values: np.ndarray | None, channels: int, trailing: int) -> bool:
    """Whether dividing ``values`` by a ``[C, 1 x trailing]`` vector keeps its broadcast: only
    its channel position may grow, from 1 to C."""
    if values is None or values.dtype != np.float32:
        return False
    padded = _padded_shape(values.shape, trailing)
    channel = len(padded) - 1 - trailing
    others = [d for i, d in enumerate(padded) if i != channel]
    grows = len(padded) > values.ndim
    # New leading dims may only be 1s up to the channel position (a scalar or [C, 1, 1]-like).
    return padded[channel] in (1, channels) and (not grows or all(d == 1 for d in others[:channel]))


class _Walk:
    def __init__(self, index: GraphIndex, channels: int, channel_axis: int, trailing: int) -> None:
        self.index = index
        self.channels = channels
        self.channel_axis = channel_axis
        self.trailing = trailing

    def readers(self, tensor: str) -> list[tuple[int, int]]:
        return [
            (i, slot)
            for i, slot in self.index.consumers.get(tensor, [])
            if self.index.node(i).op_type not in _SHAPE_READERS
        ]

    def exclusive(self, tensor: str, node_index: int) -> bool:
        """``tensor`` is read by that node only (and is no graph output)."""
        readers = self.readers(tensor)
        return (
            tensor not in self.index.graph_outputs
            and bool(readers)
            and all(i == node_index for i, _ in readers)
        )

    def vector(self, node: onnx.NodeProto, slot: int, *, multiply: bool = False) -> Edit | None:
        values = self.index.array(node.input[slot])
        if not _vector_fits(values, self.channels, self.trailing):
            return None
        return Edit(node, slot, trailing=self.trailing, multiply=multiply)

    def from_tensor(self, tensor: str, depth: int) -> list[Edit] | str:
        index = self.index
        j = index.producer.get(tensor)
        if j is None:
            return f"{tensor!r} is a graph input: nothing before it to fold into"
        if depth > _MAX_DEPTH:
            return "no op to fold into within reach"
        node = index.node(j)
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            return f"{op} {node.name} is a custom op"
        endpoint = self.endpoint(node)
        if endpoint is not None:
            return endpoint
        constants = [s for s, t in enumerate(node.input) if t and index.is_constant(t)]
        live = [s for s, t in enumerate(node.input) if t and not index.is_constant(t)]
        if op in _COMMUTING or (op == "Pad" and zero_constant_pad(index, node)):
            return self.through(j, node.input[0], [], depth)
        if op in ("Add", "Sub") and len(live) == 1 and len(constants) == 1:
            edit = self.vector(node, constants[0])
            if edit is None:
                return f"{op} {node.name}'s constant does not broadcast per channel"
            return self.through(j, node.input[live[0]], [edit], depth)
        if op in ("Mul", "Div") and len(live) == 2:
            branches = live if op == "Mul" else [0]
            reasons = []
            for slot in branches:
                found = self.through(j, node.input[slot], [], depth)
                if isinstance(found, list):
                    return found
                reasons.append(found)
            return reasons[0]
        return f"{op} {node.name} does not commute with a per-channel scale"

    def through(self, j: int, tensor: str, edits: list[Edit], depth: int) -> list[Edit] | str:
        if not self.exclusive(tensor, j):
            return f"{tensor!r} is read by other nodes too"
        found = self.from_tensor(tensor, depth + 1)
        return found if isinstance(found, str) else [*edits, *found]

    def endpoint(self, node: onnx.NodeProto) -> list[Edit] | str | None:
        """Edits absorbing ``1/s`` at ``node``, why it cannot, or None: not an endpoint."""
        index, op = self.index, node.op_type
        inputs = list(node.input)
        const = [bool(t) and index.is_constant(t) for t in inputs]
        last_axis = self.channel_axis == -1
        if op == "Mul" and len(inputs) == 2 and sum(const) == 1:
            edit = self.vector(node, const.index(True))
            return [edit] if edit else f"Mul {node.name}'s constant does not broadcast per channel"
        if op == "Div" and len(inputs) == 2 and const == [False, True]:
            edit = self.vector(node, 1, multiply=True)
            return [edit] if edit else f"Div {node.name}'s constant does not broadcast per channel"
        if op in ("BatchNormalization", "InstanceNormalization") and all(const[1:3]):
            if last_axis:
                return f"{op} {node.name}'s channels (axis 1) are not the layers' channel axis"
            return [Edit(node, 1), Edit(node, 2)]
        if op == "LayerNormalization" and len(inputs) > 1 and const[1]:
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            gamma = index.array(inputs[1])
            if not last_axis or axis != -1 or gamma is None or gamma.shape != (self.channels,):
                return f"LayerNormalization {node.name} does not normalize the channel axis alone"
            return [Edit(node, s) for s in (1, 2) if s < len(inputs) and inputs[s] and const[s]]
        if op in ("Conv", "Gemm", "MatMul") and len(inputs) > 1 and const[1]:
            return self.layer_endpoint(node, const)
        return None

    def layer_endpoint(self, node: onnx.NodeProto, const: list[bool]) -> list[Edit] | str:
        op = node.op_type
        weight = self.index.array(node.input[1])
        if weight is None or weight.dtype != np.float32:
            return f"{op} {node.name}'s weight is not float32"
        if op == "Conv":
            if self.channel_axis != 1:
                return f"Conv {node.name}'s output channels are not the layers' channel axis"
            edits = [Edit(node, 1, axis=0)]
            if len(node.input) > 2 and node.input[2]:
                if not const[2]:
                    return f"Conv {node.name}'s bias is not constant"
                edits.append(Edit(node, 2))
            return edits
        if self.channel_axis != -1 or weight.ndim != 2:
            return f"{op} {node.name}'s output channels are not the layers' channel axis"
        trans_b = op == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        edits = [Edit(node, 1, axis=0 if trans_b else 1)]
        if op == "Gemm" and len(node.input) > 2 and node.input[2]:
            edit = self.vector(node, 2) if const[2] else None
            if edit is None:
                return f"Gemm {node.name}'s C does not broadcast per channel"
            edits.append(edit)
        return edits


def fold_plan(
    index: GraphIndex,
    tensor: str,
    layers: list[str],
    *,
    channel_axis: int,
    channels: int,
    trailing: int = 0,
) -> list[Edit] | str:
    """The edits that divide ``tensor`` (read by ``layers`` at their input 0) by ``s`` per
    channel, or why there are none (then only an inserted Mul can). ``channel_axis``: 1 or -1;
    ``channels``: its size; ``trailing``: the tensor's dims after the channel axis."""
    if tensor in index.graph_outputs:
        return f"{tensor!r} is a graph output"
    names = set(layers)
    walk = _Walk(index, channels, channel_axis, trailing)
    for i, slot in walk.readers(tensor):
        node = index.node(i)
        if node.name not in names or slot != 0:
            return f"{tensor!r} is also read by {node.op_type} {node.name}"
    return walk.from_tensor(tensor, 0)
