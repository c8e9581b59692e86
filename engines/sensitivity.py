"""Per-node INT8 sensitivity, reported by ONNX node name.

For each node the Q/DQ pass quantizes (the ``quantized_nodes`` of a full-INT8
:func:`engines.graph.prepare_model`), two variants of the model are built in memory and compared
with the FP32 reference (ONNX Runtime on the original model) on held-out samples with
:func:`engines.accuracy.compare`:

- *only this*: only that node quantized (every other quantizable node kept out of INT8);
- *all but this*: every quantizable node quantized except that one.

Nodes are ranked most sensitive first: worst *only this* metric, ties broken by the best *all but
this* metric. Nothing touches the disk: variants are serialized to bytes and loaded into ONNX
Runtime sessions; the reference runs once per batch and is memoized
(:class:`engines.variants.MemoizedRunner`).

**Cheap first.** Before any variant is built, one FP32 pass measures each node's *local*
quantization error: the SQNR between every tensor the Q/DQ model quantizes on that node's inputs
(activations with the table's per-tensor scale, weights with their per-channel scales, both read
from the Q/DQ model itself) and its fake-quantized copy ``clip(round(x / s), -128, 127) * s``.
The worst input's SQNR is the node's *proxy*. Nodes are evaluated in proxy order and
``max_nodes`` stops after that many; the rest are ranked after the evaluated ones, by proxy. So
a model with ~60 quantizable nodes (EfficientNet-Lite0) gets a useful ranking from a dozen or two
evaluations.

**Execution.** Variants run in ONNX Runtime as :class:`engines.variants.QdqExecution` says:
fused into ONNX Runtime's integer kernels, or computed as written (what TensorRT follows).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from calibrators.data import CalibrationDataset
from engines.accuracy_report import AccuracyMetric
from engines.backends.base import ProgressFn
from engines.errors import SpecError
from engines.sensitivity_report import NodeSensitivity, SensitivityReport
from engines.variants import InMemoryRunner, QdqExecution, VariantEvaluator

if TYPE_CHECKING:
    from pathlib import Path

    import onnx

    from calibrators.table import CalibrationTable
    from engines.spec import BuildSpec

__all__ = ["NodeSensitivity", "SensitivityReport", "node_sensitivity", "rank_sensitivity"]

_PROXY_SAMPLES = 4


# --- the cheap proxy --------------------------------------------------------------------------


def _quantized_inputs(
    qdq: onnx.ModelProto, nodes: Sequence[str]
) -> dict[str, list[tuple[str, np.ndarray, int]]]:
    """Node -> (tensor, scale, axis) of every Q/DQ pair feeding it in the Q/DQ model."""
    from onnx import numpy_helper

    producer = {out: n for n in qdq.graph.node for out in n.output}
    inits = {t.name: t for t in qdq.graph.initializer}
    by_name = {n.name: n for n in qdq.graph.node}
    found: dict[str, list[tuple[str, np.ndarray, int]]] = {}
    for name in nodes:
        pairs = []
        for tensor in by_name[name].input if name in by_name else ():
            dq = producer.get(tensor)
            q = producer.get(dq.input[0]) if dq is not None else None
            if dq is None or dq.op_type != "DequantizeLinear" or q is None:
                continue
            if q.op_type != "QuantizeLinear" or q.input[1] not in inits:
                continue
            axis = next((int(a.i) for a in q.attribute if a.name == "axis"), 1)
            pairs.append((q.input[0], numpy_helper.to_array(inits[q.input[1]]), axis))
        found[name] = pairs
    return found


def _fake_quant_sums(values: np.ndarray, scale: np.ndarray, axis: int) -> tuple[float, float]:
    """(sum x^2, sum (fq(x) - x)^2) for symmetric INT8 fake quantization with ``scale``."""
    x = values.astype(np.float64, copy=False)
    s = scale.astype(np.float64)
    if s.ndim == 1 and s.size > 1:
        shape = [1] * x.ndim
        shape[axis % x.ndim] = s.size
        s = s.reshape(shape)
    fq = np.clip(np.rint(x / s), -128, 127) * s
    return float(np.square(x).sum()), float(np.square(fq - x).sum())


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def _proxy_scores(
    ev: VariantEvaluator, qdq: onnx.ModelProto, nodes: Sequence[str]
) -> dict[str, float]:
    """Node -> worst local quantization SQNR (dB) of its quantized inputs (module docstring)."""
    import onnx
    from onnx import numpy_helper

    from engines.graph.inspect import normalize

    inputs = _quantized_inputs(qdq, nodes)
    inits = {t.name: t for t in qdq.graph.initializer}
    keys = {(t, s.tobytes(), a): (t, s, a) for pairs in inputs.values() for t, s, a in pairs}
    sums = dict.fromkeys(keys, (0.0, 0.0))
    for key, (tensor, scale, axis) in keys.items():
        if tensor in inits:
            sums[key] = _fake_quant_sums(numpy_helper.to_array(inits[tensor]), scale, axis)
    probe = normalize(ev.model)
    produced = {out for node in probe.graph.node for out in node.output}
    wanted = {t for t, _, _ in keys.values() if t in produced}
    wanted -= {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in sorted(wanted))
    with InMemoryRunner(probe, "the FP32 model (proxy pass)", ev.threads) as runner:
        for feeds in ev.feeds(_PROXY_SAMPLES, 1):
            values = {**runner.run(feeds), **feeds}
            for key, (tensor, scale, axis) in keys.items():
                if tensor not in inits and tensor in values:
                    signal, noise = _fake_quant_sums(values[tensor], scale, axis)
                    sums[key] = (sums[key][0] + signal, sums[key][1] + noise)
    return {
        node: min((_sqnr_db(*sums[(t, s.tobytes(), a)]) for t, s, a in pairs), default=math.inf)
        for node, pairs in inputs.items()
    }


# --- ranking ----------------------------------------------------------------------------------


def _badness(value: float | None, higher_is_better: bool) -> float:
    """Larger = worse; NaN is the worst; ``None`` (not measured) the least bad."""
    if value is None:
        return -math.inf
    if math.isnan(value):
        return math.inf
    return -value if higher_is_better else value


def _ranked(
    ops: Mapping[str, str],
    proxy: Mapping[str, float],
    only: Mapping[str, float],
    all_but: Mapping[str, float],
    higher_is_better: bool,
) -> list[NodeSensitivity]:
    def key(node: str) -> tuple[bool, float, float, float]:
        return (
            node not in only,  # evaluated nodes first
            -_badness(only.get(node), higher_is_better),  # worst "only this" first
            _badness(all_but.get(node), higher_is_better),  # best "all but this" first
            proxy[node],  # worst local SQNR first
        )

    return [
        NodeSensitivity(
            node=node,
            op_type=ops[node],
            rank=i + 1,
            metric_only_this=only.get(node),
            metric_all_but_this=all_but.get(node),
            proxy_sqnr_db=proxy[node],
        )
        for i, node in enumerate(sorted(ops, key=key))
    ]


def rank_sensitivity(
    ev: VariantEvaluator,
    metric: AccuracyMetric,
    *,
    max_nodes: int | None = None,
    all_but_this: bool = True,
    samples: int | None = None,
    progress: ProgressFn | None = None,
) -> SensitivityReport:
    """Rank the quantizable nodes of ``ev``'s model (module docstring)."""
    if max_nodes is not None and max_nodes < 0:
        raise SpecError(
            f"max_nodes must be >= 0, got {max_nodes}.",
            hint="0 ranks by the cheap proxy alone; None evaluates every node.",
            field="max_nodes",
        )
    start = time.perf_counter()
    before = ev.evaluations
    qdq, nodes = ev.quantizable()
    ops = {n.name: n.op_type for n in qdq.graph.node if n.name in set(nodes)}
    proxy = _proxy_scores(ev, qdq, nodes)
    chosen = sorted(nodes, key=lambda n: proxy[n])[: len(nodes) if max_nodes is None else max_nodes]
    only: dict[str, float] = {}
    all_but: dict[str, float] = {}
    for i, node in enumerate(chosen):
        if progress is not None:
            progress(f"sensitivity of {node}", i / len(chosen))
        only[node] = ev.value([n for n in nodes if n != node], metric, samples)
        if all_but_this:
            all_but[node] = ev.value([node], metric, samples)
    return SensitivityReport(
        metric=metric,
        higher_is_better=metric.higher_is_better,
        execution=ev.execution,
        weight_levels=ev.weight_levels,
        samples=ev.samples if samples is None else min(samples, ev.samples),
        quantizable_nodes=len(nodes),
        evaluated_nodes=len(chosen),
        evaluations=ev.evaluations - before,
        seconds=time.perf_counter() - start,
        nodes=_ranked(ops, proxy, only, all_but, metric.higher_is_better),
    )


def node_sensitivity(
    model_path: Path,
    table: CalibrationTable,
    spec: BuildSpec,
    eval_dataset: CalibrationDataset,
    *,
    metric: AccuracyMetric = AccuracyMetric.SQNR_DB,
    labels: np.ndarray | None = None,
    max_nodes: int | None = None,
    all_but_this: bool = True,
    samples: int = 32,
    batch_size: int = 16,
    threads: int | None = None,
    execution: QdqExecution | None = None,
    progress: ProgressFn | None = None,
) -> SensitivityReport:
    """Rank the quantizable nodes of ``model_path`` by INT8 sensitivity, most sensitive first.

    ``metric`` is measured against the FP32 model on the first ``samples`` samples of
    ``eval_dataset`` (``labels`` are needed for ``accuracy``/``accuracy_drop``). ``max_nodes``
    evaluates only that many nodes, those the cheap proxy finds worst; ``all_but_this=False``
    skips the second variant per node (half the evaluations). ``execution``: see
    :class:`QdqExecution`. Raises :class:`SpecError` for a spec without INT8 or a metric the
    model's outputs do not report.
    """
    from engines.graph.inspect import load_model

    with VariantEvaluator(
        load_model(model_path),
        spec,
        table,
        eval_dataset,
        labels=labels,
        max_samples=samples,
        batch_size=batch_size,
        threads=threads,
        execution=execution,
    ) as ev:
        return rank_sensitivity(
            ev, metric, max_nodes=max_nodes, all_but_this=all_but_this, progress=progress
        )
