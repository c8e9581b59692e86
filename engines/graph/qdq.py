"""Calibration table -> QuantizeLinear/DequantizeLinear pairs placed the way TensorRT wants them.

Every pair is symmetric INT8: a constant, strictly positive float32 scale, an explicit int8 zero
point of 0, and an explicit ``axis`` on both nodes (TensorRT's ONNX importer assumes 0 when it is
missing, ONNX assumes 1). Activations are quantized per tensor with ``scale = amax / 127`` straight
from the table (a TensorRT cache stores exactly this float). Weights stay FP32 initializers and
go through ``QuantizeLinear -> DequantizeLinear`` per output channel with
``scale_k = max(max|W_k| / 127, 2**-14)`` (:func:`calibrators.weights.weight_scales`, shared with
the calibration methods that measure a layer's error); TensorRT folds the pair into INT8 weights at
build time. A channel whose every weight quantizes to 0 under the floor (a max of 3.2e-40, a
denormal, was seen in a real detector's 1x1 Conv) is written as exact zeros, so the FP32 weight,
its INT8 copy and any float16 copy all agree. Where the pairs go is decided in
:mod:`engines.graph._qdq_plan`.

A model that already carries Q/DQ (quantization-aware training, Model Optimizer exports; see
:mod:`engines.graph.prequantized`) is returned as it is: its scales are kept and nothing is
quantized twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper
from pydantic import BaseModel, ConfigDict, Field

from calibrators.weights import INT8_LEVELS, quantize_weight, weight_scales
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
from engines.graph.prequantized import PrequantizedReport, ScaleSource, inspect_quantization
from engines.spec import Precision

if TYPE_CHECKING:
    from calibrators.table import CalibrationTable

__all__ = ["MIN_QDQ_OPSET", "QuantizationReport", "insert_qdq"]

MIN_QDQ_OPSET = 13
"""Per-channel QuantizeLinear/DequantizeLinear (the ``axis`` attribute) exist since opset 13."""



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
    scale_source: ScaleSource = ScaleSource.TABLE
    """``calibration table``, or ``prequantized: scales from the model`` when the model carried
    its own Q/DQ and was left as it is (then ``prequantized`` says what it holds)."""
    prequantized: PrequantizedReport | None = None
    zeroed_weight_channels: dict[str, int] = Field(default_factory=dict)
    """Weight -> output channels written as exact zeros: every weight of the channel is below
    half the scale floor (e.g. denormals), so INT8 holds them as 0 anyway."""

    @property
    def num_quantized(self) -> int:
        return len(self.quantized_nodes)


def insert_qdq(
    model: onnx.ModelProto,
    table: CalibrationTable | None,
    *,
    keep: tuple[str, ...] = (),
    quantize_attention: bool = False,
    weight_levels: int = INT8_LEVELS,
) -> tuple[onnx.ModelProto, QuantizationReport]:
    """Insert Q/DQ pairs into a copy of ``model`` from ``table``'s ranges.

    ``weight_levels``: weights use ``scale_k = max|W_k| / weight_levels``; 127 is full INT8 (what
    TensorRT wants). 63 gives 7-bit weights, which ONNX Runtime needs on x86 CPUs without VNNI:
    their u8s8 kernels add pairs of 8-bit products in 16 bits (VPMADDUBSW) and saturate otherwise.

    ``keep``: node names, op types or ``re:<regex>`` patterns whose nodes stay unquantized.
    ``quantize_attention``: also quantize attention cores, GEMV MatMuls, LayerNormalization and
    GELU inputs (off by default: they lose accuracy and rarely gain speed in INT8).

    A model that carries Q/DQ already (:func:`engines.graph.prequantized.is_prequantized`) is only
    normalized: its pairs and scales are kept, ``table`` (which may then be None) is not used,
    and the report's ``scale_source`` says ``prequantized: scales from the model``. Otherwise
    ``table`` is required (:class:`SpecError`).

    The model is normalized first (:func:`engines.graph.inspect.normalize`) and raised to opset 13
    when it is older and something is quantized. The result passes
    ``onnx.checker.check_model(full_check=True)``; otherwise :class:`GraphError`.
    """
    work = normalize(model)
    carried = inspect_quantization(work)
    if carried.prequantized:
        return work, _prequantized_report(work, carried)
    Precision.INT8.require_table(table)
    assert table is not None
    plan = plan_qdq(GraphIndex.build(work), table, keep=keep, quantize_attention=quantize_attention)
    if plan.rewires and default_opset(work) < MIN_QDQ_OPSET:
        work = normalize(_raise_opset(work, MIN_QDQ_OPSET))
        plan = plan_qdq(
            GraphIndex.build(work), table, keep=keep, quantize_attention=quantize_attention
        )
    index = GraphIndex.build(work)
    scales = {key: _scale(index, table, plan, key, weight_levels) for key in plan.keys}
    zeroed: dict[str, int] = {}
    if plan.rewires:
        zeroed = _zero_dead_channels(work, index, plan, weight_levels)
        _emit(work, plan, scales)
        work = infer_shapes(work)
        check_model(work, "Q/DQ", original=model)
    report = QuantizationReport(
        quantized_nodes=plan.quantized,
        skipped=plan.skipped,
        quantized_tensors={name: plan.tensors[name] for name in plan.quantized},
        qdq_pairs=len(scales),
        opset=default_opset(work),
        zeroed_weight_channels=zeroed,
    )
    return work, report


def _prequantized_report(work: onnx.ModelProto, carried: PrequantizedReport) -> QuantizationReport:
    return QuantizationReport(
        quantized_nodes=carried.quantized_nodes,
        skipped={},
        opset=default_opset(work),
        scale_source=ScaleSource.MODEL,
        prequantized=carried,
    )


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


def _scale(
    index: GraphIndex, table: CalibrationTable, plan: QdqPlan, key: QdqKey, weight_levels: int
) -> np.ndarray:
    """The float32 scale of one pair: scalar per tensor, 1-D per channel."""
    values = index.array(key.tensor)
    if key.weight and values is not None:
        return weight_scales(values, key.axis, weight_levels)
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
    return weight_scales(np.asarray([amax]), None)


def _zero_dead_channels(
    model: onnx.ModelProto, index: GraphIndex, plan: QdqPlan, weight_levels: int
) -> dict[str, int]:
    """Write exact zeros into weight channels that quantize to all zeros (under the scale floor).

    Only weights that nothing reads but their Q/DQ pair are rewritten, so no unquantized reader
    sees different values. Returns weight -> number of channels zeroed.
    """
    readers: dict[str, int] = {}
    for slots in plan.rewires.values():
        for key in slots.values():
            readers[key.tensor] = readers.get(key.tensor, 0) + 1
    zeroed: dict[str, int] = {}
    for key in plan.keys:
        values = index.array(key.tensor)
        if not key.weight or key.axis is None or values is None or values.ndim == 0:
            continue
        if len(index.consumers.get(key.tensor, [])) != readers.get(key.tensor, 0):
            continue
        q, _ = quantize_weight(values, key.axis, weight_levels)
        moved_q = np.moveaxis(q, key.axis, 0).reshape(q.shape[key.axis], -1)
        moved_w = np.moveaxis(values, key.axis, 0).reshape(q.shape[key.axis], -1)
        dead = ~np.any(moved_q, axis=1) & np.any(moved_w, axis=1)
        if not np.any(dead):
            continue
        cleaned = np.array(values, dtype=np.float32, copy=True)
        view = np.moveaxis(cleaned, key.axis, 0)
        view[dead] = 0.0
        initializer = next(t for t in model.graph.initializer if t.name == key.tensor)
        initializer.CopyFrom(numpy_helper.from_array(cleaned, key.tensor))
        zeroed[key.tensor] = int(dead.sum())
    return zeroed


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
