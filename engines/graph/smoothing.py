"""SmoothQuant / cross-layer equalization: move activation outliers into the weights.

An INT8 activation has one scale for all its channels, so a few wide channels (transformer
hidden states; the 1x1 Convs of depthwise-separable CNNs, where one input channel reaches 0.415
and the median 0.051) leave the others a handful of levels. Dividing input channel ``j`` by
``s_j`` and multiplying the weights that read it by ``s_j`` computes the same function, and with

    s_j = max|X_j|^a / max|W_j|^(1 - a)        (Xiao et al., SmoothQuant, 2023)

the activation's channels become alike while the weights, quantized per *output* channel, take
part of the spread. ``a`` is searched per layer over :data:`DEFAULT_ALPHAS` on the calibration
rows (:mod:`engines.graph.layer_stats`) by the INT8 error of the layer's output: activation
quantized per tensor at the smoothed max, weights per output channel, as the Q/DQ pass will.
The scales are normalized so the smoothed tensor keeps its original peak.

``1/s`` must go somewhere exact, so the graph stays a plain graph TensorRT builds. Walking back
from the activation through ops that commute with a positive per-channel scale (Relu, LeakyRelu,
PRelu, max and average pools, zero Pad, Add/Sub of a constant, whose constant is divided too), it
is folded into the first op that can absorb it: a Conv/Gemm/MatMul's output channels (and bias),
a BatchNormalization's or LayerNormalization's scale and bias, or the constant of a Mul/Div. Clip,
HardSwish, Sigmoid, GELU and the like do not commute (``relu6(x / s) != relu6(x) / s``) and stop
the walk, as does any tensor read by something else. Where no exact fold exists, a ``Mul`` by
``1/s`` is inserted before the layers instead, only when it lowers the error by
``min_gain_with_mul`` (it costs a pointwise op). Readers of the tensor's shape only (Shape, Size)
do not count as readers.

Layers that read one tensor (Q, K and V) share one ``s``: ``max|W_j|`` is taken over all of them
and the error is their mean. ``auto`` applies a smoothing where it lowers that error by
``min_gain``; ``on`` applies the best ``a`` wherever a place for ``1/s`` exists; ``off`` nothing.

Runs on the FP32 model *before* calibration: the table must be computed on the smoothed model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

from calibrators.weights import INT8_LEVELS, fake_quantize, fake_quantize_weight
from engines.graph._layers import LinearLayer, layer_output, linear_layers
from engines.graph._onnx import (
    GraphIndex,
    NameAllocator,
    check_model,
    infer_shapes,
    subgraph_references,
)
from engines.graph._patterns import is_gemv
from engines.graph._smooth_fold import Edit, fold_plan
from engines.graph.inspect import normalize
from engines.graph.prequantized import PREQUANTIZED_REASON, is_prequantized
from engines.spec import TechniqueMode, node_matches
from engines.techniques import SmoothedTensor, SmoothingReport

if TYPE_CHECKING:
    from engines.graph.layer_stats import LayerInput, LayerStats

__all__ = ["DEFAULT_ALPHAS", "SmoothingResult", "smooth"]

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_SCALE_BOUND = 1e3
"""Scales are kept in [1/1000, 1000]: beyond that float16 copies of the folded constants lose
precision for no measurable gain."""


@dataclass(frozen=True)
class SmoothingResult:
    """The smoothed model, the report, and the layer statistics of the smoothed model (for
    :func:`engines.graph.bias.correct_biases`)."""

    model: onnx.ModelProto
    report: SmoothingReport
    stats: LayerStats


@dataclass(frozen=True)
class _Search:
    alpha: float | None
    scales: np.ndarray
    error_before: float
    error_after: float


def smooth(
    model: onnx.ModelProto,
    stats: LayerStats,
    *,
    mode: TechniqueMode = TechniqueMode.AUTO,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
    keep: tuple[str, ...] = (),
    quantize_attention: bool = False,
    weight_levels: int = INT8_LEVELS,
    min_gain: float = 0.05,
    min_gain_with_mul: float = 0.25,
) -> SmoothingResult:
    """Smooth a copy of the FP32 ``model`` with ``stats`` collected on it (module docstring).

    ``keep`` and ``quantize_attention`` as for the Q/DQ pass: layers it leaves in high precision
    are not smoothed. ``min_gain``: the relative error reduction ``auto`` asks of an exact fold;
    ``min_gain_with_mul``: of an inserted Mul. The result passes the ONNX checker.
    """
    mode = TechniqueMode(mode)
    work = normalize(model)
    if mode is TechniqueMode.OFF or is_prequantized(work):
        why = "off" if mode is TechniqueMode.OFF else PREQUANTIZED_REASON
        return SmoothingResult(work, SmoothingReport(mode=mode, not_run=why), stats)
    index = GraphIndex.build(work)
    groups, skipped = _groups(index, stats, keep, quantize_attention)
    writer = _Writer(work, index)
    tensors: list[SmoothedTensor] = []
    updated: dict[str, LayerInput] = {}
    for tensor, members in groups.items():
        inputs = [stats.inputs[layer.node] for layer in members]
        weights = [writer.weight(m) for m in members]
        search = _search(members, inputs, weights, alphas, weight_levels)
        first = members[0]
        plan = fold_plan(
            index,
            tensor,
            [m.node for m in members],
            channel_axis=first.channel_axis,
            channels=int(inputs[0].absmax.size),
            trailing=0 if first.channel_axis == -1 else len(first.kernel),
        )
        gain = 1.0 - search.error_after / search.error_before if search.error_before > 0 else 0.0
        needed = min_gain if isinstance(plan, list) else min_gain_with_mul
        reason = ""
        if search.alpha is None:
            reason = "no channel statistics to smooth"
        elif mode is TechniqueMode.AUTO and gain < needed:
            reason = f"lowers the INT8 error by {gain:.1%} (< {needed:.0%} asked)"
        record = SmoothedTensor(
            tensor=tensor,
            layers=[m.node for m in members],
            applied=not reason,
            alpha=search.alpha,
            sqnr_before_db=_db(search.error_before),
            sqnr_after_db=_db(search.error_after),
            reason=reason,
        )
        if not reason:
            where, renamed = writer.apply(members, search.scales, plan, tensor)
            record = record.model_copy(
                update={"folded_into": where, "inserted_mul": not isinstance(plan, list)}
            )
            for layer, stat in zip(members, inputs, strict=True):
                updated[layer.node] = stat.divided(search.scales, renamed)
        tensors.append(record)
    work = writer.finish()
    work = infer_shapes(work)
    check_model(work, "smoothing", original=model)
    report = SmoothingReport(mode=mode, tensors=tensors, skipped=skipped)
    return SmoothingResult(work, report, stats.replaced(updated))


def _groups(
    index: GraphIndex, stats: LayerStats, keep: tuple[str, ...], quantize_attention: bool
) -> tuple[dict[str, list[LinearLayer]], dict[str, str]]:
    """Layers by the tensor they read (graph order), and the layers left out with the reason."""
    groups: dict[str, list[LinearLayer]] = {}
    skipped: dict[str, str] = {}
    nodes = {n.name: n for n in index.nodes}
    for layer in linear_layers(index.model):
        node = nodes[layer.node]
        if node_matches(keep, layer.node, layer.op_type):
            skipped[layer.node] = "kept by user"
        elif not quantize_attention and is_gemv(index, node):
            skipped[layer.node] = "GEMV-shaped MatMul (stays high precision)"
        elif layer.node not in stats.inputs:
            skipped[layer.node] = stats.missing.get(layer.node, "no statistics")
        else:
            groups.setdefault(layer.activation, []).append(layer)
    for tensor, members in list(groups.items()):
        if len({m.channel_axis for m in members}) > 1:
            del groups[tensor]
            for m in members:
                skipped[m.node] = f"layers read {tensor!r} along different channel axes"
    return groups, skipped


def _search(
    layers: list[LinearLayer],
    inputs: list[LayerInput],
    weights: list[np.ndarray],
    alphas: tuple[float, ...],
    levels: int,
) -> _Search:
    absmax = np.max([stat.absmax for stat in inputs], axis=0)
    channels = absmax.size
    wmax = np.zeros(channels)
    matrices = []
    for layer, weight in zip(layers, weights, strict=True):
        matrix = layer.matrix(weight)
        matrices.append(matrix)
        k, per_group, _ = matrix.shape
        grouped = np.abs(matrix).reshape(layer.groups, k // layer.groups, per_group, -1)
        wmax = np.maximum(wmax, grouped.max(axis=(1, 3)).reshape(channels))

    references = [
        layer_output(stat.rows, matrix, layer.groups)
        for layer, stat, matrix in zip(layers, inputs, matrices, strict=True)
    ]
    signals = [float(np.sum(np.square(r, dtype=np.float64))) for r in references]

    def error(scales: np.ndarray) -> float:
        amax = float(np.max(absmax / scales))
        total = 0.0
        for layer, stat, matrix, reference, signal in zip(
            layers, inputs, matrices, references, signals, strict=True
        ):
            rows = stat.rows / scales.astype(np.float32)[None, :, None]
            smoothed = _scale_matrix(matrix, scales, layer.groups)
            quantized = layer_output(
                fake_quantize(rows, amax), fake_quantize_weight(smoothed, 0, levels), layer.groups
            )
            noise = float(np.sum(np.square(reference - quantized, dtype=np.float64)))
            total += noise / max(signal, 1e-30)
        return total / len(layers)

    ones = np.ones(channels)
    before = error(ones)
    live = (absmax > 0) & (wmax > 0)
    if not np.any(live) or before == 0.0:
        return _Search(None, ones, before, before)
    best = _Search(None, ones, before, math.inf)
    for alpha in alphas:
        scales = _scales(absmax, wmax, live, alpha)
        after = error(scales)
        if after < best.error_after:
            best = _Search(alpha, scales, before, after)
    return best


def _scales(absmax: np.ndarray, wmax: np.ndarray, live: np.ndarray, alpha: float) -> np.ndarray:
    scales = np.ones_like(absmax)
    scales[live] = absmax[live] ** alpha / wmax[live] ** (1.0 - alpha)
    scales[~live] = 1.0
    # Keep the smoothed tensor's peak where it was: scales are defined up to a common factor.
    scales *= float(np.max(absmax / scales)) / float(np.max(absmax))
    return np.asarray(np.clip(scales, 1.0 / _SCALE_BOUND, _SCALE_BOUND))


def _scale_matrix(matrix: np.ndarray, scales: np.ndarray, groups: int) -> np.ndarray:
    """``[K, C/G, P]`` weights with input channel ``j`` (over all groups) times ``scales[j]``."""
    k, per_group, taps = matrix.shape
    grouped = matrix.reshape(groups, k // groups, per_group, taps)
    factor = scales.reshape(groups, 1, per_group, 1)
    return np.asarray((grouped * factor).reshape(k, per_group, taps), dtype=np.float32)


def _db(error: float) -> float | None:
    if error <= 0:
        return None
    return round(-10.0 * math.log10(error), 3)


class _Writer:
    """Applies scales to a normalized model: weights and folded constants are rewritten by
    (node, slot), copied first when another node reads them too; Muls are inserted at the end."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex) -> None:
        self.model = model
        self.index = index
        self.names = NameAllocator(model)
        self.values: dict[str, np.ndarray] = {}
        self.own: set[str] = set()
        self.muls: list[tuple[str, onnx.NodeProto]] = []
        self.nodes = {n.name: n for n in model.graph.node}

    def weight(self, layer: LinearLayer) -> np.ndarray:
        """The layer's weight as rewritten so far."""
        return self.value(self.nodes[layer.node].input[1])

    def value(self, name: str) -> np.ndarray:
        if name in self.values:
            return self.values[name]
        values = self.index.array(name)
        assert values is not None
        return values

    def _write(self, node: onnx.NodeProto, slot: int, values: np.ndarray) -> None:
        name = node.input[slot]
        shared = len(self.index.consumers.get(name, [])) > 1 or name in self.index.declared_inputs
        if shared and name not in self.own:
            name = self.names.fresh(f"{name}_smoothed")
            node.input[slot] = name
            self.own.add(name)
        self.values[name] = values.astype(np.float32)

    def apply(
        self, layers: list[LinearLayer], scales: np.ndarray, plan: list[Edit] | str, tensor: str
    ) -> tuple[str, str | None]:
        """Scale the layers' weights by ``scales`` and put ``1/scales`` where ``plan`` says (or
        into a new Mul). Returns (where 1/s went, the layers' new input name or None)."""
        for layer in layers:
            node = self.nodes[layer.node]
            self._write(node, 1, layer.scale_inputs(self.weight(layer), scales))
        if isinstance(plan, list):
            for edit in plan:
                current = self.value(edit.node.input[edit.slot])
                self._write(edit.node, edit.slot, edit.apply(current, scales))
            last = plan[-1].node
            return f"{last.op_type} {last.name}", None
        axis = layers[0].channel_axis
        shape = (-1,) if axis == -1 else (-1,) + (1,) * len(layers[0].kernel)
        inverse = self.names.fresh(f"{tensor}_smooth_scale")
        self.values[inverse] = (1.0 / scales).reshape(shape).astype(np.float32)
        smoothed = self.names.fresh(f"{tensor}_smoothed")
        mul = helper.make_node(
            "Mul", [tensor, inverse], [smoothed], name=self.names.fresh(f"{tensor}_Smooth")
        )
        for layer in layers:
            self.nodes[layer.node].input[0] = smoothed
        self.muls.append((layers[0].node, mul))
        return f"Mul {mul.name}", smoothed

    def finish(self) -> onnx.ModelProto:
        graph = self.model.graph
        existing = {t.name: t for t in graph.initializer}
        for name, values in self.values.items():
            tensor = numpy_helper.from_array(values, name)
            if name in existing:
                existing[name].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
        before = {first: mul for first, mul in self.muls}
        nodes: list[onnx.NodeProto] = []
        for node in graph.node:
            if node.name in before:
                nodes.append(before[node.name])
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        self._drop_unused()
        return self.model

    def _drop_unused(self) -> None:
        graph = self.model.graph
        used = {t for n in graph.node for t in n.input} | {i.name for i in graph.input}
        used |= {o.name for o in graph.output} | subgraph_references(graph)
        kept = [t for t in graph.initializer if t.name in used]
        if len(kept) != len(graph.initializer):
            del graph.initializer[:]
            graph.initializer.extend(kept)
