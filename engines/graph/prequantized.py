"""Models that already carry their quantization: what is there, and that it is left alone.

Quantization-aware training and NVIDIA Model Optimizer export QuantizeLinear/DequantizeLinear
pairs with the scales the training or calibration settled on; some exports store weights as int8
initializers read by a lone DequantizeLinear. Such a model is built as it is: the Q/DQ pass keeps
its pairs and scales and adds none (:func:`engines.graph.qdq.insert_qdq`), the FP16 pass keeps its
Q/DQ in float32 (:func:`engines.graph.fp16.convert_fp16`), and no calibration is needed.

:func:`inspect_quantization` says what the model holds; :func:`is_prequantized` is its one bit.
ONNX Runtime's integer operator format (QLinearConv, MatMulInteger, ...) counts as prequantized too,
but TensorRT cannot parse it: :attr:`PrequantizedReport.integer_ops` names those nodes' op types.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import onnx
from onnx import TensorProto
from pydantic import BaseModel, ConfigDict, Field

from engines.graph._onnx import GraphIndex

__all__ = [
    "PREQUANTIZED_REASON",
    "PrequantizedReport",
    "ScaleSource",
    "inspect_quantization",
    "is_prequantized",
]

PREQUANTIZED_REASON = "prequantized model: scales from the model, nothing re-quantized"
"""Why calibration, smoothing and bias correction do not run on a prequantized model."""

_QDQ_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})
_INTEGER_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeLinear",
    }
)
_INT_TYPES = frozenset(
    {
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT4,
        TensorProto.UINT4,
        TensorProto.INT16,
        TensorProto.UINT16,
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E5M2,
    }
)


class ScaleSource(StrEnum):
    """Where a quantized model's scales come from (the report's and the sidecar's wording)."""

    TABLE = "calibration table"
    MODEL = "prequantized: scales from the model"


class PrequantizedReport(BaseModel):
    """The quantization a model carries before trtforge touches it."""

    model_config = ConfigDict(frozen=True)

    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    quantized_weights: list[str] = Field(default_factory=list)
    """Constants read through a DequantizeLinear: an int8 initializer, or a float initializer
    behind a QuantizeLinear."""
    quantized_activations: list[str] = Field(default_factory=list)
    """Computed tensors that go through QuantizeLinear -> DequantizeLinear."""
    quantized_nodes: list[str] = Field(default_factory=list)
    """Nodes reading a DequantizeLinear output, in graph order."""
    integer_ops: dict[str, int] = Field(default_factory=dict)
    """ONNX Runtime integer-format ops (QLinearConv, ...) -> count; TensorRT cannot parse them."""

    @property
    def prequantized(self) -> bool:
        return bool(self.quantize_nodes or self.dequantize_nodes or self.integer_ops)

    @property
    def weight_only(self) -> bool:
        """Weights quantized, activations not (weight-only quantization)."""
        return bool(self.quantized_weights) and not self.quantized_activations

    @property
    def scale_source(self) -> ScaleSource | None:
        return ScaleSource.MODEL if self.prequantized else None


def _is_qdq(node: onnx.NodeProto, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in _QDQ_DOMAINS


def inspect_quantization(model: onnx.ModelProto) -> PrequantizedReport:
    """What quantization ``model``'s top-level graph carries (no copy, no change)."""
    index = GraphIndex.build(model)
    weights: dict[str, None] = {}
    activations: dict[str, None] = {}
    readers: dict[str, None] = {}
    quantize = dequantize = 0
    integer: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in _INTEGER_OPS:
            integer[node.op_type] = integer.get(node.op_type, 0) + 1
        if _is_qdq(node, "QuantizeLinear"):
            quantize += 1
        if not _is_qdq(node, "DequantizeLinear") or not node.input:
            continue
        dequantize += 1
        source = node.input[0]
        q = index.producer_node(source)
        if q is not None and _is_qdq(q, "QuantizeLinear") and q.input:
            original = q.input[0]
            kind = weights if _constant(index, original) else activations
            kind.setdefault(original, None)
        elif _constant(index, source) or index.elem_type.get(source) in _INT_TYPES:
            weights.setdefault(source, None)
        for reader in index.consumer_nodes(node.output[0]):
            readers.setdefault(reader.name, None)
    return PrequantizedReport(
        quantize_nodes=quantize,
        dequantize_nodes=dequantize,
        quantized_weights=list(weights),
        quantized_activations=list(activations),
        quantized_nodes=[n.name for n in model.graph.node if n.name in readers],
        integer_ops=integer,
    )


def _constant(index: GraphIndex, tensor: str) -> bool:
    if index.is_constant(tensor):
        return True
    producer = index.producer_node(tensor)
    return producer is not None and producer.op_type == "Constant"


def is_prequantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` carries Q/DQ (or integer-format ops) already: build it as it is,
    without calibration."""
    return any(
        (n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in _QDQ_DOMAINS)
        or n.op_type in _INTEGER_OPS
        for n in model.graph.node
    )


def file_is_prequantized(path: Path) -> bool:
    """:func:`is_prequantized` of the model at ``path`` (read without its weights); False when
    it cannot be read (the build's own loading then says why)."""
    from core.errors import ModelError
    from core.onnxio import load_onnx

    try:
        return is_prequantized(load_onnx(Path(path), load_external_data=False))
    except ModelError:
        return False
