"""Which nodes a build *kept* out of the reduced precision: the report's ``kept_nodes``.

The passes record a decision for every node they look at, and most of those decisions are not
something a user would call "kept": a MaxPool gets no Q/DQ because Q/DQ commute with it (it runs
in INT8 all the same), a Concat whose output feeds nothing quantized has nothing to gain, the
Q/DQ nodes themselves keep float32 scales, a Shape op has no FP16 kernel. Listing those buried
the few nodes that matter (a classifier's report listed 262 "kept" nodes, 236 of them Q/DQ).

A node is kept when a user would expect it in the reduced precision and it is not there:

- INT8: a node with INT8 kernels (Conv, ConvTranspose, Gemm, MatMul, AveragePool,
  GlobalAveragePool, LayerNormalization, GELU) left unquantized for a reason that costs
  precision: a keep rule (``kept by user``; the accuracy budget search's nodes arrive as keep
  rules), no range in the table, an attention/GEMV/LayerNorm/GELU rule. Any node a keep rule
  matched is listed too. Not listed: placement decisions (MaxPool, residual Adds and Concats
  fused elsewhere or feeding nothing quantized), inputs that are not float32, and inputs already
  dequantized by the model's own Q/DQ (those nodes *are* quantized).
- FP16: a node left FP32 for a reason that costs speed: a keep rule, the FP16 range (calibrated
  amax or constants beyond it, possible overflow), subgraphs, custom ops, unknown types. Not
  listed: Q/DQ nodes, nodes the INT8 pass quantized (unless a keep rule names them), nodes with
  no float output (a Shape reading a wide tensor) and ops with nothing to convert (no FP16
  kernel in the schema, attribute-typed outputs, Range).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

    from engines.graph.fp16 import Fp16Report
    from engines.graph.qdq import QuantizationReport

__all__ = ["kept_nodes"]

_INT8_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "AveragePool",
        "GlobalAveragePool",
        "LayerNormalization",
    }
)
_NOT_A_LOSS_INT8 = (
    "is not float32",
    "is already dequantized",
    "missing input",
)
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_NOT_A_LOSS_FP16 = (
    "no FP16 kernel",
    "output type is set by an attribute",
    "Range's length",
    "Q/DQ keeps float32 scales",
)
_KEPT_BY_USER = "kept by user"


def _int8_kept(reason: str, op_type: str) -> bool:
    if reason == _KEPT_BY_USER:
        return True
    if any(part in reason for part in _NOT_A_LOSS_INT8):
        return False
    return op_type in _INT8_OPS or "GELU" in reason


def _fp16_kept(reason: str, op_type: str) -> bool:
    return op_type not in _QDQ_OPS and not any(part in reason for part in _NOT_A_LOSS_FP16)


def _float_outputs(model: onnx.ModelProto) -> dict[str, bool]:
    """Node -> whether any output may be float (True when a type is unknown)."""
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    graph = model.graph
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*graph.value_info, *graph.output, *graph.input)
        if v.type.HasField("tensor_type")
    }
    return {
        node.name: any(types.get(o, TensorProto.FLOAT) in floats for o in node.output if o)
        for node in graph.node
    }


def kept_nodes(
    model: onnx.ModelProto,
    quantization: QuantizationReport | None,
    fp16: Fp16Report | None,
) -> dict[str, str]:
    """Node -> why it stays out of the reduced precision (``not INT8: ...``, then
    ``FP32: ...``), for the nodes the module docstring calls kept, in the passes' order.
    ``model`` is the prepared model (its nodes give the op types)."""
    op_types = {node.name: node.op_type for node in model.graph.node}
    computes_float = _float_outputs(model) if fp16 is not None else {}
    kept: dict[str, str] = {}
    quantized: set[str] = set()
    if quantization is not None:
        quantized = set(quantization.quantized_nodes)
        for name, why in quantization.skipped.items():
            if _int8_kept(why, op_types.get(name, "")):
                kept[name] = f"not INT8: {why}"
    if fp16 is not None:
        for name, why in fp16.fp32_nodes.items():
            if name in quantized and why != _KEPT_BY_USER:
                continue  # INT8 already; its FP16 decision is about the Q/DQ around it
            if not _fp16_kept(why, op_types.get(name, "")) or not computes_float.get(name, True):
                continue  # nothing to convert, or no float output (Shape of a wide tensor)
            kept[name] = f"{kept[name]}; FP32: {why}" if name in kept else f"FP32: {why}"
    return kept
