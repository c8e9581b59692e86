"""Calibration table -> QuantizeLinear/DequantizeLinear pairs placed the way TensorRT wants them.

Every pair is symmetric INT8: a constant, strictly positive float32 scale, an explicit int8 zero
point of 0, and an explicit ``axis`` on both nodes (TensorRT's ONNX importer assumes 0 when it is
missing, ONNX assumes 1). Activations are quantized per tensor with ``scale = amax / 127`` straight
from the table (a TensorRT cache stores exactly this float). Weights stay FP32 initializers and
go through ``QuantizeLinear -> DequantizeLinear`` per output channel with
``scale_k = max|W_k| / 127``; TensorRT folds the pair into INT8 weights at build time. Where the
pairs go is decided in :mod:`engines.graph._qdq_plan`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field

from engines.errors import GraphError
from engines.graph._onnx import (
    GraphIndex,
    NameAllocator,
    check_model,
    default_opset,
    infer_shapes,
    set_default_opset,
)
from engines.graph._qdq_plan import QdqKey, QdqPlan, plan_qdq, table_amax
from engines.graph.inspect import normalize

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable

__all__ = ["MIN_QDQ_OPSET", "QuantizationReport", "insert_qdq"]

MIN_QDQ_OPSET = 13
"""Per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) exist since opset 13."""

_INT8_MAX = 127.0
_MIN_SCALE = 1e-12
"""Scale given to an all-zero weight channel: any positive scale maps zeros to zero."""


class QuantizationReport(BaseModel):
    """What the Q/DQ pass did: nodes quantized, and nodes left out with the reason."""

    model_config = ConfigDict(frozen=True)

    quantized_nodes: list[str]
    """Nodes whose inputs now read dequantized INT8 tensors, in graph order."""
    skipped: dict[str, str]
    """Node -> why it stays in high precision: ``no range: ...``, ``kept by user``,
    ``excluded by rule: ...``."""
    quantized_tensors: dict[str, list[str]] = Field(default_factory=dict)
    """Quantized node -> the original tensors whose Q/DQ pairs it reads. A Conv reading a zero
    Pad lists the Pad's input, where its activation pair sits."""
    qdq_pairs: int = 0
    """QuantizeLinear/DequantizeLinear pairs inserted (shared tensors are quantized once)."""
    opset: int = 0
    """Default-domain opset of the output model."""

    @property
    def num_quantized(self) -> int:
        return len(self.quantized_nodes)


def insert_qdq(
    model: onnx.ModelProto,
    table: CalibrationTable,
    *,
    keep: tuple[str, ...] = (),
    quantize_attention: bool = False,
    weight_levels: int = 127,
) -> tuple[onnx.ModelProto, QuantizationReport]:
    """Insert Q/DQ pairs into a copy of ``model`` from ``table``'s ranges.

    ``weight_levels``: weights use ``scale_k = max|W_k| / weight_levels``; 127 is full INT8 (what
    TensorRT wants). 63 gives 7-bit weights, which ONNX Runtime needs on x86 CPUs without VNNI:
    their u8s8 kernels add pairs of 8-bit products in 16 bits (VPMADDUBSW) and saturate otherwise.

    ``keep``: node names, op types or ``re:<regex>`` patterns whose nodes stay unquantized.
    ``quantize_attention``: also quantize attention cores, GEMV MatMuls, LayerNormalization and
    GELU inputs (off by default: they lose accuracy and rarely gain speed in INT8).

    The model is normalized first (:func:`engines.graph.inspect.normalize`) and raised to opset 13
    when it is older and something is quantized. The result passes
    ``onnx.checker.check_model(full_check=True)``; otherwise :class:`GraphError`.
    """
    work = normalize(model)
    plan = plan_qdq(GraphIndex.build(work), table, keep=keep, quantize_attention=quantize_attention)
    if plan.rewires and default_opset(work) < MIN_QDQ_OPSET:
        work = normalize(_raise_opset(work, MIN_QDQ_OPSET))
        plan = plan_qdq(
            GraphIndex.build(work), table, keep=keep, quantize_attention=quantize_attention
        )
    index = GraphIndex.build(work)
    scales = {key: _scale(index, table, plan, key, weight_levels) for key in plan.keys}
    if plan.rewires:
        _emit(work, plan, scales)
        work = infer_shapes(work)
        check_model(work, "Q/DQ", original=model)
    report = QuantizationReport(
        quantized_nodes=plan.quantized,
        skipped=plan.skipped,
        quantized_tensors={name: plan.tensors[name] for name in plan.quantized},
        qdq_pairs=len(scales),
        opset=default_opset(work),
    )
    return work, report


def _raise_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Convert to ``version`` with ONNX's version converter (adapters rewrite changed ops)."""
    current = default_opset(model)
    try:
        if current == 0:
            converted = onnx.ModelProto()
            converted.CopyFrom(model)
            set_default_opset(converted, version)
        else:
            converted = onnx.version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises RuntimeError/ConvertError for missing adapters
        raise GraphError(
            f"Cannot convert the model from opset {current} to {version}, which Q/DQ with "
            f"per-channel weights needs: {exc}",
            hint=f"Re-export the model with opset {version} or newer (e.g. torch.onnx.export("
            f"..., opset_version=17)).",
            field="model",
        ) from exc
    converted.ir_version = max(converted.ir_version, 7)  # opset 13 needs IR version 7
    return converted


def _weight_scale(values: np.ndarray, axis: int | None, levels: float = _INT8_MAX) -> np.ndarray:
    magnitude = np.abs(values.astype(np.float64))
    if axis is None:
        amax = np.asarray(magnitude.max() if magnitude.size else 0.0)
    else:
        amax = np.moveaxis(magnitude, axis, 0).reshape(values.shape[axis], -1).max(axis=1)
    scale = (amax / levels).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(_MIN_SCALE)).astype(np.float32)


def _scale(
    index: GraphIndex, table: CalibrationTable, plan: QdqPlan, key: QdqKey, weight_levels: int
) -> np.ndarray:
    """The float32 scale of one pair: scalar per tensor, 1-D per channel."""
    values = index.array(key.tensor)
    if key.weight and values is not None:
        return _weight_scale(values, key.axis, float(weight_levels))
    root = plan.groups.get(key.tensor)
    members = [t for t, r in plan.groups.items() if r == root] if root is not None else []
    best: tuple[float, str] | None = None
    for tensor in members or [key.tensor]:
        amax = _member_amax(index, table, tensor)
        if amax is not None and (best is None or amax > best[0]):
            best = (amax, tensor)
    if best is None:  # the planner only asks for tensors with a range
        raise GraphError(f"Tensor {key.tensor!r} has no range in the calibration table.")
    amax, tensor = best
    if tensor in table.amax:
        return np.asarray(table.scale(tensor), dtype=np.float32)
    return _weight_scale(np.asarray([amax]), None)


def _member_amax(index: GraphIndex, table: CalibrationTable, tensor: str) -> float | None:
    amax = table_amax(table, tensor)
    if amax is not None:
        return amax
    values = index.array(tensor)
    if values is None or values.size == 0 or not np.all(np.isfinite(values)):
        return None
    peak = float(np.abs(values).max())
    return peak if peak > 0 else None


def _emit(model: onnx.ModelProto, plan: QdqPlan, scales: dict[QdqKey, np.ndarray]) -> None:
    """Rewrite ``model`` in place: Q/DQ pairs right before their first reader, inputs rewired."""
    graph = model.graph
    names = NameAllocator(model)
    dequantized: dict[QdqKey, str] = {}
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(graph.node):
        for slot, key in sorted(plan.rewires.get(i, {}).items()):
            if key not in dequantized:
                dequantized[key] = _append_pair(graph, nodes, names, key, scales[key])
            node.input[slot] = dequantized[key]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _append_pair(
    graph: onnx.GraphProto,
    nodes: list[onnx.NodeProto],
    names: NameAllocator,
    key: QdqKey,
    scale: np.ndarray,
) -> str:
    base = key.tensor
    scale_name = names.fresh(f"{base}_scale")
    zero_name = names.fresh(f"{base}_zero_point")
    quantized = names.fresh(f"{base}_quantized")
    dequantized = names.fresh(f"{base}_dequantized")
    graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), scale_name))
    graph.initializer.append(
        numpy_helper.from_array(np.zeros(scale.shape, dtype=np.int8), zero_name)
    )
    # Per tensor the axis is ignored, but TensorRT and ONNX disagree on its default: write it.
    axis = key.axis if key.axis is not None else 0
    nodes.append(
        helper.make_node(
            "QuantizeLinear",
            [base, scale_name, zero_name],
            [quantized],
            name=names.fresh(f"{base}_QuantizeLinear"),
            axis=axis,
        )
    )
    nodes.append(
        helper.make_node(
            "DequantizeLinear",
            [quantized, scale_name, zero_name],
            [dequantized],
            name=names.fresh(f"{base}_DequantizeLinear"),
            axis=axis,
        )
    )
    return dequantized
