"""Subgraph patterns the precision passes treat specially: attention cores, GELU, GEMV."""

from __future__ import annotations

import onnx

from engines.graph._onnx import GraphIndex

__all__ = ["attention_cores", "gelu_nodes", "is_gemv"]

# Ops that sit between an attention MatMul and its Softmax in exported transformers: scaling,
# masking, layout changes.
_SCORE_PATH = frozenset(
    {"Mul", "Div", "Add", "Sub", "Where", "Cast", "Reshape", "Transpose", "Identity", "Clip"}
)
_PROB_PATH = frozenset({"Reshape", "Transpose", "Cast", "Identity", "Dropout"})


def _reaches_softmax(index: GraphIndex, tensor: str, depth: int) -> bool:
    """Whether ``tensor`` flows into a Softmax through at most ``depth`` score-path ops."""
    frontier = [tensor]
    for _ in range(depth + 1):
        following: list[str] = []
        for name in frontier:
            for consumer in index.consumer_nodes(name):
                if consumer.op_type == "Softmax":
                    return True
                if consumer.op_type in _SCORE_PATH:
                    following.extend(o for o in consumer.output if o)
        frontier = following
    return False


def _comes_from_softmax(index: GraphIndex, tensor: str, depth: int) -> bool:
    """Whether ``tensor`` is a Softmax output, possibly through layout-only ops."""
    name = tensor
    for _ in range(depth + 1):
        producer = index.producer_node(name)
        if producer is None:
            return False
        if producer.op_type == "Softmax":
            return True
        if producer.op_type not in _PROB_PATH or not producer.input:
            return False
        name = producer.input[0]
    return False


def attention_cores(index: GraphIndex) -> set[str]:
    """Names of activation x activation MatMuls around a Softmax: QK^T and attention @ V."""
    cores: set[str] = set()
    for node in index.nodes:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        if any(index.is_constant(i) for i in node.input[:2]):
            continue
        if _reaches_softmax(index, node.output[0], 4) or any(
            _comes_from_softmax(index, i, 3) for i in node.input[:2]
        ):
            cores.add(node.name)
    return cores


def is_gemv(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A MatMul with one row (M == 1) or one column (N == 1): no tensor-core tile to fill."""
    if node.op_type != "MatMul" or len(node.input) < 2:
        return False
    if index.rows(node.input[0]) == 1:
        return True
    b_shape = index.shape.get(node.input[1])
    return b_shape is not None and (len(b_shape) == 1 or b_shape[-1] == 1)


def gelu_nodes(index: GraphIndex) -> dict[str, tuple[str, set[str]]]:
    """GELU activations: head node name -> (its input tensor, names of nodes reading that input).

    Recognizes the ``Gelu`` op (opset 20) and the Erf form exporters write:
    ``x / sqrt(2) -> Erf -> + 1 -> * x -> * 0.5`` (in any order of the multiplications).
    """
    found: dict[str, tuple[str, set[str]]] = {}
    for node in index.nodes:
        if node.op_type == "Gelu" and node.input:
            found[node.name] = (node.input[0], {node.name})
        elif node.op_type == "Erf":
            pattern = _erf_gelu(index, node)
            if pattern is not None:
                found[node.name] = pattern
    return found


def _erf_gelu(index: GraphIndex, erf: onnx.NodeProto) -> tuple[str, set[str]] | None:
    scale = index.producer_node(erf.input[0])
    if scale is None or scale.op_type not in ("Div", "Mul") or len(scale.input) != 2:
        return None
    if not index.is_constant(scale.input[1]):
        return None
    x = scale.input[0]
    # Nodes downstream of Erf within the GELU tail (Add 1, Mul x, Mul 0.5).
    tail: set[str] = set()
    frontier = [erf.output[0]]
    for _ in range(3):
        following: list[str] = []
        for name in frontier:
            for consumer in index.consumer_nodes(name):
                if consumer.op_type in ("Add", "Mul"):
                    tail.add(consumer.name)
                    following.extend(consumer.output)
        frontier = following
    readers = {scale.name}
    for consumer in index.consumer_nodes(x):
        if consumer.name in tail:
            readers.add(consumer.name)
        elif consumer.op_type == "Mul" and any(
            c.name in tail for o in consumer.output for c in index.consumer_nodes(o)
        ):
            readers.add(consumer.name)  # x * 0.5 first, then * (1 + erf)
    if len(readers) < 2:
        return None
    return x, readers
